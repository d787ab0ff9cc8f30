"""prepare-data on a Ray Data pipeline: the shards are a function of the data and the seed, the same byte for byte
whether this process, one Ray worker or two, or a Ray cluster reached at an address made them; each domain holds
out exactly its share of documents, drawn across the inputs."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_file, read_split

from ercstudy.platform.cli import main
from ercstudy.platform.data import census
from ercstudy.platform.data.prepare import prepare_data
from ercstudy.trainables.shards import ShardMeta

SEQ = 32


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """Three JSONL.gz inputs whose records mix two sources (the domains) in different proportions."""
    d = tmp_path_factory.mktemp("jsonl")
    docs = [(name, p.strip()) for name in ("early", "late")
            for p in fixture_file(f"{name}.txt").read_text().split("\n\n") if p.strip()]
    order = np.random.default_rng(0).permutation(len(docs))
    paths = []
    for i, part in enumerate(np.array_split(order, [len(docs) // 5, len(docs) // 2])):
        path = d / f"part-{i}.jsonl.gz"
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps({"text": docs[j][1], "source": docs[j][0]}) + "\n" for j in part)
        paths.append(str(path))
    return paths


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def prepare(inputs: list[str], out: Path, workers: int) -> Path:
    # a small shuffle memory: several buckets, so several shards per split, each a bucket's
    prepare_data(inputs, str(out), vocab_size=300, seq_len=SEQ, domain_field="source", shuffle_bytes=64 << 10,
                 rows_per_shard=40, seed=5, workers=workers, progress=False)
    return out


def test_the_shards_are_the_same_byte_for_byte_whatever_runs_them(inputs, ray_session, tmp_path):
    here = files(prepare(inputs, tmp_path / "here", 0))
    assert sum(name.startswith("train/") for name in here) >= 4 and sum(name.startswith("eval/") for name in here) >= 1
    assert not any(name.startswith("_spill") for name in here)  # the shuffle's spill files are gone
    for workers in (1, 2):
        assert files(prepare(inputs, tmp_path / f"ray{workers}", workers)) == here, workers


def test_prepare_data_runs_on_the_ray_cluster_at_an_address(inputs, ray_session, tmp_path, capsys):
    """A separate `ercstudy prepare-data --address` process, a driver of the session's Ray as of any cluster."""
    address = ray_session.get_runtime_context().gcs_address
    reference = files(prepare(inputs, tmp_path / "here", 0))
    out = tmp_path / "cluster"
    done = subprocess.run([sys.executable, "-m", "ercstudy", "prepare-data", *inputs, "--out", str(out), "--vocab-size", "300",
                           "--seq-len", str(SEQ), "--domain-field", "source", "--rows-per-shard", "40", "--seed", "5",
                           "--address", address], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"on the Ray cluster at {address}" in done.stderr
    # the default shuffle memory holds the corpus in one bucket: the same rows, in one shard series per split
    got = {split: read_split(out, split) for split in ("train", "eval")}
    want = {split: read_split(tmp_path / "here", split) for split in ("train", "eval")}
    for split in ("train", "eval"):
        assert sorted(map(bytes, got[split][0])) == sorted(map(bytes, want[split][0])), split
    assert files(out)["tokenizer.json"] == reference["tokenizer.json"]
    # the nodes of a cluster do not see this machine's relative paths: refused before anything starts
    assert main(["prepare-data", "part-0.jsonl.gz", "--out", str(tmp_path / "rel"), "--address", address]) == 2
    assert "a relative path, which the cluster's nodes do not see" in capsys.readouterr().err


def test_each_domain_holds_out_exactly_its_share_drawn_across_the_inputs():
    documents = [{"a": 30, "b": 5}, {"a": 50}, {"a": 20, "b": 15}]
    index = {"a": 0, "b": 1}
    draws = [census.held_out_counts(documents, 0.1, seed, index) for seed in range(200)]
    for held in draws:
        assert sum(h.get("a", 0) for h in held) == 10 and sum(h.get("b", 0) for h in held) == 2
        assert all(0 <= h[d] <= docs[d] for h, docs in zip(held, documents) for d in docs)
    # hypergeometric: input 1 holds half of domain a's documents, so half of its held-out ones on average
    assert np.mean([held[1]["a"] for held in draws]) == pytest.approx(5, abs=0.4)
    assert census.held_out_counts(documents, 0.1, 3, index) == census.held_out_counts(documents, 0.1, 3, index)


def test_meta_counts_what_the_shards_hold(inputs, tmp_path):
    out = prepare(inputs, tmp_path / "out", 0)
    meta = ShardMeta.read(out)
    assert meta.domains == ["early", "late"] or meta.domains == ["late", "early"]
    assert meta.train_sequences == len(read_split(out, "train")[0]) and meta.eval_sequences == len(read_split(out, "eval")[0])


def test_a_bad_input_found_by_a_ray_task_is_one_line(inputs, ray_session, tmp_path, capsys):
    """With a pretrained tokenizer the inputs are counted in Ray tasks: a line that is no JSON, deep in a file that
    starts well, reaches the command as its one-line error, exit status 2, and nothing is left in --out."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["to be or not to be"] * 10, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.writelines(json.dumps({"text": f"line {i}", "source": "x"}) + "\n" for i in range(50))
        f.write("{not json\n")
    out = tmp_path / "out"
    assert main(["prepare-data", *inputs, str(bad), "--out", str(out), "--tokenizer", str(tmp_path / "tokenizer.json"),
                 "--domain-field", "source", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ercstudy: error: input ") and "bad.jsonl.gz: line 51 is not a JSON object" in err[-1], err[-1]
    assert not any(out.iterdir())


def test_a_spill_file_is_the_same_whether_its_rows_were_held_in_one_run_or_merged_from_many(tmp_path):
    """Each bucket's rows in row order, one contiguous segment per bucket: the same bytes whatever the run size, and
    every row read back from its bucket's segment."""
    import pyarrow.fs as pafs

    from ercstudy.platform.data.spill import SpillFile, bucket_segments, buckets_of, read_segments

    fs = pafs.LocalFileSystem()
    rows = np.random.default_rng(0).integers(0, 1000, size=(500, 9), dtype=np.int32)
    written = {}
    for run_rows in (7, 64, 10_000):
        spill = SpillFile(fs, str(tmp_path / f"run{run_rows}.bin"), 9, 5, (3, 1, 0), run_rows=run_rows)
        for start in range(0, 500, 37):  # rows arrive in pieces, as packing adds them
            spill.add(rows[start : start + 37], domain=start % 4)
        counts = spill.close()
        written[run_rows] = (counts.tolist(), (tmp_path / f"run{run_rows}.bin").read_bytes())
    assert written[7] == written[64] == written[10_000]
    bucket = buckets_of((3, 1, 0), 0, 500, 5)
    for b, segment in enumerate(bucket_segments(str(tmp_path / "run7.bin"), counts)):
        got = read_segments(fs, [segment], 9)
        assert np.array_equal(got[:, :9], rows[bucket == b]) and np.array_equal(got[:, 9], (np.flatnonzero(bucket == b) // 37 * 37) % 4)
