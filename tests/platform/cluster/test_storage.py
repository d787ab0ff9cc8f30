"""A study's storage on a real S3-compatible server (conftest's moto server on loopback, a fresh bucket per test).

Units: platform/cluster/storage.py's locations (resolve, read, write, list, upload, temporary local copies,
the checkpoint `ercstudy eval` finds). Refusals: a bad storage is one line on stderr and exit 2
before Ray, MLflow or any trial. End to end (the quickstart study in a bucket, its driver killed, resumed from
a fresh working directory, then `report` and `eval` from the bucket alone, with every working directory
deleted): tests/integration/test_study_run.py.
"""

import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from conftest import own_stderr

from ercstudy.platform.cli import main
from ercstudy.platform.cluster import storage as locations
from ercstudy.trainables.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------------------------------------
# The storage module


def test_local_paths_resolve_absolute_and_relative_ones_are_refused_on_a_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = locations.resolve("results")
    assert loc.uri == str(tmp_path / "results") and not loc.remote and isinstance(loc.fs, pafs.LocalFileSystem)
    assert (loc / "study").uri == str(tmp_path / "results" / "study")
    assert locations.resolve(f"file://{tmp_path}/x").path == str(tmp_path / "x")
    assert locations.resolve(str(tmp_path), multi_node=True).uri == str(tmp_path)  # absolute: a mount every node may share
    with pytest.raises(locations.StorageError, match="relative path"):
        locations.resolve("results", multi_node=True)
    with pytest.raises(locations.StorageError, match="unknown scheme ftp://"):
        locations.resolve("ftp://host/x")


def test_a_bucket_location_reads_writes_lists_uploads_and_copies_down(bucket, tmp_path):
    loc = locations.resolve(f"{bucket}/studies/")
    assert loc.remote and loc.uri == f"{bucket}/studies" and loc.path == f"{bucket[5:]}/studies"
    assert not loc.exists()
    locations.check(loc)  # reachable, the bucket exists, writable
    assert loc.children() == []  # the probe is gone (pyarrow leaves the empty prefix as a directory marker)
    (loc / "s" / "study.json").write_text('{"a": 1}')
    assert (loc / "s" / "study.json").is_file() and (loc / "s").is_dir() and (loc / "s" / "study.json").read_text() == '{"a": 1}'
    local = tmp_path / "report"
    (local / "sub").mkdir(parents=True)
    (local / "report.md").write_text("# r\n")
    (local / "sub" / "x.txt").write_text("x")
    (loc / "s" / "report").upload(local)
    assert (loc / "s").children() == ["report", "study.json"]
    assert (loc / "s" / "report").children() == ["report.md", "sub"]
    with (loc / "s" / "report").local_copy() as copy:
        assert (copy / "report.md").read_text() == "# r\n" and (copy / "sub" / "x.txt").read_text() == "x"
        cache = copy
    assert not cache.exists()  # the copy was a cache, deleted after the block
    with locations.resolve(str(local)).local_copy() as same:
        assert same == local  # a local directory is used where it is


def test_eval_finds_the_newest_checkpoint_of_a_run_uri_or_a_studys_trial(bucket):
    run = locations.resolve(f"{bucket}/st/study/train/train-abc_00001")
    for name in ("checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-02_00-00-00.000000"):
        (run / name / "ds" / "mp_rank_00_model_states.pt").write_text("x")
    (run / "checkpoint_2026-01-03_00-00-00.000000" / "partial.txt").write_text("no ds/ inside")  # not a checkpoint
    newest = "checkpoint_2026-01-02_00-00-00.000000"
    assert locations.find_checkpoint(run.uri, "unused").name == newest
    assert locations.find_checkpoint(f"{run.uri}/checkpoint_2026-01-01_00-00-00.000000", "unused").name.endswith("01-01_00-00-00.000000")
    assert locations.find_checkpoint("study/abc_00001", f"{bucket}/st").uri == f"{run.uri}/{newest}"
    with pytest.raises(CheckpointError, match="nor a trial 'nope' of a study 'study'"):
        locations.find_checkpoint("study/nope", f"{bucket}/st")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        locations.find_checkpoint(f"{bucket}/st/study", "unused")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        locations.find_checkpoint(f"{bucket}/nothing-here", "unused")


# ---------------------------------------------------------------------------------------------
# Bad storage: one line, exit 2, before Ray, MLflow or any trial


def tiny_study(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    data["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "refused"}
    data.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def refused(argv, capsys) -> str:
    started = time.monotonic()
    assert main(argv) == 2, argv
    elapsed = time.monotonic() - started
    err = own_stderr(capsys.readouterr().err)
    assert err.startswith("ercstudy: error: ") and "\n" not in err, err
    assert elapsed < 20, (argv, elapsed)  # no waiting on Ray or retries for minutes
    return err


def no_credentials(monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))


def test_bad_storage_is_one_line_and_exit_2_before_any_trial_or_parent_run(bucket, tmp_path, monkeypatch, capsys):
    spec = tiny_study(tmp_path)
    missing = f"{bucket}-missing"
    assert "bucket" in refused(["run", str(spec), "--storage", f"{missing}/studies"], capsys)
    assert "does not exist" in refused(["resume", "quickstart", "--storage", f"{missing}/studies"], capsys)
    assert "does not exist" in refused(["report", "quickstart", "--storage", f"{missing}/studies"], capsys)
    assert "no study 'quickstart'" in refused(["resume", "quickstart", "--storage", f"{bucket}/studies"], capsys)
    assert "does not exist" in refused(["eval", f"{missing}/s/train/train-x", "--tasks", "t"], capsys)
    assert "does not exist" in refused(["train", str(spec), "--storage", f"{missing}/runs"], capsys)
    # the study's own storage: key, when --storage is not given
    assert f"bucket '{missing[5:]}' does not exist" in refused(["run", str(tiny_study(tmp_path, storage=f"{missing}/x"))], capsys)
    # a relative path on a cluster (--address; submit always): it would be a different directory on every node
    monkeypatch.chdir(tmp_path)
    assert "relative path" in refused(["run", str(spec), "--storage", "results", "--address", "127.0.0.1:1"], capsys)
    assert "relative path" in refused(["submit", "study.yaml", "--storage", "results", "--address", "http://127.0.0.1:1"], capsys)
    with monkeypatch.context() as m:
        no_credentials(m, tmp_path)
        assert "no AWS credentials" in refused(["run", str(spec), "--storage", f"{bucket}/studies"], capsys)
    with monkeypatch.context() as m:
        from ercstudy.netutil import free_port

        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        assert "cannot reach http://127.0.0.1:" in refused(["run", str(spec), "--storage", f"{bucket}/studies"], capsys)
    # nothing was started: no MLflow store (so no parent run), nothing written to the bucket or here
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "results").exists()
    assert locations.resolve(bucket).children() == []
