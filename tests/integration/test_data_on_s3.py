"""Data stays where it lives: prepare-data writes shards to S3, the data stream reads them there, submit ships no
data. (A submitted study's trial training on shards in the bucket: test_submit.py.)

Against the real S3-compatible server of conftest (moto's standalone server on loopback, credentials and
endpoint in the standard AWS_* environment that pyarrow reads)."""


import pyarrow.fs as pafs
import pytest
import yaml
from conftest import SEQ, fixture_file, own_stderr, prepare_shards

from ercstudy.netutil import free_ports
from ercstudy.platform.cli import main
from ercstudy.trainables.data import ParquetStream
from ercstudy.trainables.shards import ShardMeta

PREPARE = ["--vocab-size", "300", "--seq-len", str(SEQ), "--rows-per-shard", "200", "--eval-fraction", "0.1"]


@pytest.fixture
def s3_shards(bucket):
    """prepare-data's shards of the Shakespeare excerpts, written straight into the bucket."""
    return prepare_shards(f"{bucket}/text/shards")


def test_prepare_data_writes_the_shards_into_a_bucket(s3_shards, shards):
    fs, root = pafs.FileSystem.from_uri(s3_shards)
    names = sorted(i.path[len(root) + 1 :] for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if i.type == pafs.FileType.File)
    assert {"meta.json", "tokenizer.json", "train/part-00000-00000.parquet", "eval/part-00000-00000.parquet"} <= set(names)
    meta = ShardMeta.read(s3_shards)
    # the same inputs, flags and seed as the session's local shards: the same result, byte for byte
    assert meta == ShardMeta.read(shards)
    with fs.open_input_stream(f"{root}/tokenizer.json") as f:
        assert f.read() == (shards / "tokenizer.json").read_bytes()
    assert len([n for n in names if n.startswith("train/")]) == -(-meta.train_sequences // 200)


def test_the_stream_reads_the_same_batches_from_the_bucket_as_from_a_local_copy(s3_shards, tmp_path):
    import torch

    from ercstudy.trainables.evals import EvalConfig, build_evaluator

    local = tmp_path / "copy"
    pafs.copy_files(s3_shards, str(local))
    meta = ShardMeta.read(local)
    per_epoch = meta.train_sequences // 64
    for rank in range(2):
        streams = [ParquetStream(where, num_domains=2, seq_len=SEQ - 4, global_batch=64, micro_batch=16, rank=rank, world=2)
                   for where in (s3_shards, str(local))]
        assert streams[0].batches_per_epoch == streams[1].batches_per_epoch == per_epoch
        for step in (1, 2, per_epoch, per_epoch + 1):  # across the epoch boundary, read ahead in its thread
            for micro in range(2):
                remote, copy = (s.micro_batch(step, micro) for s in streams)
                assert torch.equal(remote.tokens, copy.tokens) and torch.equal(remote.domains, copy.domains), (rank, step)
    # the held-out set, read for the evaluator, too
    from ercstudy.trainables.data import DataConfig

    evaluators = [build_evaluator(EvalConfig(sequences=40), DataConfig(kind="parquet", path=where), seq_len=SEQ, seed=0,
                                  rank=0, world=1, device=torch.device("cpu")) for where in (s3_shards, str(local))]
    assert torch.equal(evaluators[0].tokens, evaluators[1].tokens) and evaluators[0].tokens.shape == (40, SEQ + 1)
    assert evaluators[0].domain_names == ["early", "late"]


def test_a_checkpoint_carries_the_tokenizer_from_the_bucket(s3_shards, tmp_path):
    from ercstudy.trainables.checkpoint import write_extras
    from ercstudy.trainables.config import TrialConfig

    cfg = TrialConfig.from_dict({"model": {"vocab_size": 320, "seq_len": SEQ}, "data": {"kind": "parquet", "path": s3_shards}})
    assert cfg.data.path == s3_shards  # a URI is kept as it is (a path would be made absolute)
    write_extras(tmp_path, cfg)
    fs, root = pafs.FileSystem.from_uri(s3_shards)
    with fs.open_input_stream(f"{root}/tokenizer.json") as f:
        assert (tmp_path / "tokenizer.json").read_bytes() == f.read()


def test_bad_output_and_missing_data_in_a_bucket_are_one_line(bucket, tmp_path, capsys):
    text = str(fixture_file("early.txt"))
    assert main(["prepare-data", text, "--out", "s3://no-such-bucket-anywhere/shards", *PREPARE]) == 2
    assert capsys.readouterr().err.strip() == "ercstudy: error: --out s3://no-such-bucket-anywhere/shards: no bucket " \
                                              "'no-such-bucket-anywhere' (create it first)"
    assert main(["prepare-data", text, "--out", f"{bucket}/a", *PREPARE]) == 0
    capsys.readouterr()
    assert main(["prepare-data", text, "--out", f"{bucket}/a", *PREPARE]) == 2
    assert capsys.readouterr().err.strip().endswith("output directory is not empty")
    trial = tmp_path / "trial.yaml"
    trial.write_text(f"model: {{vocab_size: 320, seq_len: {SEQ}}}\ndata: {{kind: parquet, path: {bucket}/nothing}}\n")
    assert main(["train", str(trial), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ercstudy: error: data.path: {bucket}/nothing holds no meta.json; make shards with `ercstudy prepare-data`"


def submit_study(tmp_path, data_path: str):
    """A quickstart study on Parquet data in tmp_path/project (the directory a submit ships)."""
    from pathlib import Path

    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "search_spaces" / "quickstart.yaml").read_text())
    data["base"]["data"] = {"kind": "parquet", "path": data_path}
    data["base"]["model"]["vocab_size"] = 320
    data["base"]["model"]["seq_len"] = SEQ
    (project / "study.yaml").write_text(yaml.safe_dump(data))
    return project


def test_submit_refuses_data_the_cluster_cannot_see_and_checks_a_data_uri(s3_shards, bucket, tmp_path, monkeypatch, capsys):
    (port,) = free_ports(1)
    address = f"http://127.0.0.1:{port}"  # nothing listens: a submit that passes every check fails to connect
    refused = {
        "data/shards": "is a relative path, which the cluster's nodes do not see",
        str(tmp_path / "project" / "data" / "shards"): "is inside the directory being submitted",
        str(tmp_path / "elsewhere"): "is in this machine's temporary directory",
        "file:///mnt/shards": "is a file on this machine",
        f"{bucket}/missing": "holds no meta.json",
    }
    for path, why in refused.items():
        monkeypatch.chdir(submit_study(tmp_path, path))
        assert main(["submit", "study.yaml", "--address", address, "--storage", f"{bucket}/results"]) == 2, path
        err = own_stderr(capsys.readouterr().err)
        assert err.startswith(f"ercstudy: error: data.path: {path} ") and why in err and "\n" not in err, err
        if "://" not in path:
            assert "working_dir carries code, never data" in err and "--out s3://" in err
    fs, root = pafs.FileSystem.from_uri(s3_shards)
    fs.delete_dir_contents(f"{root}/eval")
    monkeypatch.chdir(submit_study(tmp_path, s3_shards))
    assert main(["submit", "study.yaml", "--address", address, "--storage", f"{bucket}/results"]) == 2
    assert own_stderr(capsys.readouterr().err) == (f"ercstudy: error: data.path: {s3_shards} holds no Parquet shards in "
                                                   "eval/; make them with `ercstudy prepare-data`")


def test_submit_passes_shards_in_a_bucket_and_ships_no_data(s3_shards, bucket, tmp_path, monkeypatch, capsys):
    """Data in the bucket passes the data check (the submit then fails only to reach the cluster), and the
    working_dir a job would ship leaves out a ./data folder."""
    from ercstudy.platform import cli

    project = submit_study(tmp_path, s3_shards)
    (project / "data" / "shards").mkdir(parents=True)
    (project / "data" / "shards" / "part-00000.parquet").write_bytes(b"x" * 1000)
    monkeypatch.chdir(project)
    (port,) = free_ports(1)
    submitted = []

    class Client:  # what submit hands Ray's Jobs API, without a cluster
        def __init__(self, address):
            pass

        def submit_job(self, **kwargs):
            submitted.append(kwargs)
            return "job-1"

    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", Client)
    assert cli.main(["submit", "study.yaml", "--address", f"http://127.0.0.1:{port}", "--storage", f"{bucket}/results"]) == 0
    out = capsys.readouterr().out
    assert "as Ray job job-1" in out, out
    env = submitted[0]["runtime_env"]
    assert env["working_dir"] == "." and "/data" in env["excludes"]
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(project, env["excludes"])
    assert excluded(project / "data" / "shards" / "part-00000.parquet") and excluded(project / "data")
    assert not excluded(project / "study.yaml")
