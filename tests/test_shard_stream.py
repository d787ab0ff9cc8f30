"""Parquet shards as the training stream: step s is global batch s, each worker reads its own share,
and a resumed worker starts at its step's rows without reading the ones before."""

import numpy as np
from conftest import SEQ
from test_prepare_data import read_split

from ercstudy.trainables.data import ParquetStream
from ercstudy.trainables.shards import ROW_GROUP_ROWS, ShardMeta

G = 64  # global batch


def stream(shards, rank, world):
    meta = ShardMeta.read(shards)
    return ParquetStream(shards, num_domains=len(meta.domains), seq_len=SEQ - 4, global_batch=G, micro_batch=16 // world,
                         rank=rank, world=world)


def test_step_s_is_global_batch_s_across_the_epoch_boundary(shards):
    tokens, domains = read_split(shards, "train")
    one = stream(shards, 0, 1)
    per_epoch = one.batches_per_epoch
    assert per_epoch == len(tokens) // G >= 3
    for s in [1, 2, per_epoch, per_epoch + 1]:
        row0 = ((s - 1) % per_epoch) * G
        got = np.concatenate([one.micro_batch(s, m).tokens.numpy() for m in range(4)])
        assert np.array_equal(got, tokens[row0 : row0 + G, : SEQ - 3]), s
        assert np.array_equal(np.concatenate([one.micro_batch(s, m).domains.numpy() for m in range(4)]), domains[row0 : row0 + G])


def test_ranks_split_the_global_batch_and_a_late_resume_reads_only_its_rows(shards):
    tokens, _ = read_split(shards, "train")
    meta, big, world = ShardMeta.read(shards), 256, 4
    ranks = [ParquetStream(shards, num_domains=2, seq_len=SEQ - 4, global_batch=big, micro_batch=16, rank=r, world=world)
             for r in range(world)]  # fresh streams: a worker group resumed at step `late`
    late = ranks[0].batches_per_epoch - 1
    assert late >= 3 and meta.train_sequences >= late * big
    pieces = [ranks[r].micro_batch(late, m).tokens.numpy() for r in range(world) for m in range(4)]
    row0 = (late - 1) * big
    assert np.array_equal(np.concatenate(pieces), tokens[row0 : row0 + big, : SEQ - 3])
    for r, s in enumerate(ranks):
        lo, hi = row0 + r * big // world, row0 + (r + 1) * big // world  # this rank's share of the step
        starts = s.index.starts
        own = [g for g in range(len(starts) - 1) if starts[g] < hi and starts[g + 1] > lo]
        # it decoded exactly the row groups that hold its share (then the next step's, read ahead), none before
        assert s.index.groups_read[: len(own)] == own
        assert min(s.index.groups_read) == own[0] and starts[own[0]] > 0
        assert sum(starts[g + 1] - starts[g] for g in own) < big  # less than the whole global batch


def test_shards_are_written_in_small_row_groups(shards):
    import pyarrow.parquet as pq

    for f in sorted((shards / "train").glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        assert all(meta.row_group(g).num_rows <= ROW_GROUP_ROWS for g in range(meta.num_row_groups))
