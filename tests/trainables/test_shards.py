"""Parquet shards as the training stream: step s is global batch s, each worker reads its own share,
and a resumed worker starts at its step's rows without reading the ones before."""

import numpy as np
import pytest
from conftest import SEQ, read_split

from ercstudy.trainables.data import ParquetStream, RayDataStream
from ercstudy.trainables.shards import ROW_GROUP_ROWS, ShardMeta

G = 64  # global batch


def stream(shards, rank, world, kind=ParquetStream, seed=None):
    meta = ShardMeta.read(shards)
    return kind(shards, num_domains=len(meta.domains), seq_len=SEQ - 4, global_batch=G, micro_batch=16 // world,
                rank=rank, world=world, seed=seed)


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


@pytest.mark.ray
def test_ray_data_reads_the_same_batches_and_a_late_start_skips_the_files_before_it(shards, ray_session):
    """data.reader: ray_data: every step's share equals the direct reader's, on 2 ranks across the epoch boundary,
    in one read per epoch; a worker starting late (a restart) reads from the file of its step's first row."""
    direct = [stream(shards, r, 2) for r in range(2)]
    by_ray = [stream(shards, r, 2, RayDataStream) for r in range(2)]
    per_epoch = by_ray[0].batches_per_epoch
    for s in range(1, per_epoch + 3):
        for r in range(2):
            for m in range(2):
                want, got = direct[r].micro_batch(s, m), by_ray[r].micro_batch(s, m)
                assert np.array_equal(got.tokens.numpy(), want.tokens.numpy()), (s, r, m)
                assert np.array_equal(got.domains.numpy(), want.domains.numpy()), (s, r, m)
    assert by_ray[0].reads == [(1, 0), (per_epoch + 1, 0)]  # one ordered read per epoch, none per step
    late = stream(shards, 1, 2, RayDataStream)
    step = per_epoch - 1
    got = late.micro_batch(step, 1).tokens.numpy()
    assert np.array_equal(got, direct[1].micro_batch(step, 1).tokens.numpy())
    (start, first), = late.reads
    assert start == step and first > 0 and late.file_starts[first] <= (step - 1) * G < late.file_starts[first + 1]
    # a seed's rotation: the same batches as the direct reader's with that seed, from the rotated start on
    seeded, seeded_direct = stream(shards, 0, 2, RayDataStream, seed=6), stream(shards, 0, 2, seed=6)
    for s in (1, 2):
        assert np.array_equal(seeded.micro_batch(s, 0).tokens.numpy(), seeded_direct.micro_batch(s, 0).tokens.numpy()), s
    seeded._batches.close()  # its Ray Data read, before the shared Ray goes
    assert seeded.offset > 0 and seeded.reads[0][1] == int(np.searchsorted(seeded.file_starts, seeded.offset * G, side="right")) - 1


def test_the_seed_rotates_the_order_and_the_position_stays_a_function_of_the_step(shards):
    """search.repeats' seeds train on the batches in different orders: train.seed rotates where the stream starts;
    over an epoch each seed still reads every global batch once, and a fresh (resumed) stream reads what the
    uninterrupted one did."""
    from ercstudy.trainables.data import DataConfig, build_train_data

    tokens, _ = read_split(shards, "train")
    cfg = DataConfig(kind="parquet", path=str(shards))
    by_seed = {seed: build_train_data(cfg, seq_len=SEQ - 4, seed=seed, global_batch=G, micro_batch=16, rank=0, world=1)
               for seed in (5, 6)}
    per_epoch = by_seed[5].batches_per_epoch
    assert by_seed[5].offset != by_seed[6].offset and all(0 <= s.offset < per_epoch for s in by_seed.values())

    def first_row_of(s, step):  # which global batch of the split the stream trains on at `step`
        got = np.concatenate([s.micro_batch(step, m).tokens.numpy() for m in range(4)])
        rows = [b for b in range(per_epoch) if np.array_equal(got, tokens[b * G : (b + 1) * G, : SEQ - 3])]
        assert len(rows) == 1, step
        return rows[0]

    orders = {seed: [first_row_of(s, step) for step in range(1, per_epoch + 2)] for seed, s in by_seed.items()}
    for seed, order in orders.items():
        assert sorted(order[:per_epoch]) == list(range(per_epoch)) and order[per_epoch] == order[0], seed  # an epoch, then again
        assert order[0] == by_seed[seed].offset
    assert orders[5][0] != orders[6][0]
    late = 3
    fresh = build_train_data(cfg, seq_len=SEQ - 4, seed=6, global_batch=G, micro_batch=16, rank=0, world=1)
    assert first_row_of(fresh, late) == orders[6][late - 1]  # a resume at step `late` reads the same rows
