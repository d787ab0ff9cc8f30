"""A study's storage on a real S3-compatible server (conftest's moto server on loopback, a fresh bucket per test).

Units: platform/storage.py's locations (resolve, read, write, list, upload, temporary local copies,
the checkpoint `ercstudy eval` finds). Refusals: a bad storage is one line on stderr and exit 2
before Ray, MLflow or any trial. End to end: a study in a bucket, its driver killed, resumed from
a fresh working directory, then `report` and `eval` from the bucket alone, with every working
directory deleted.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from conftest import SEQ, own_stderr, shakespeare_text

from ercstudy.platform import storage as store
from ercstudy.platform.cli import main
from ercstudy.trainables.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The storage module


def test_local_paths_resolve_absolute_and_relative_ones_are_refused_on_a_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = store.resolve("results")
    assert loc.uri == str(tmp_path / "results") and not loc.remote and isinstance(loc.fs, pafs.LocalFileSystem)
    assert (loc / "study").uri == str(tmp_path / "results" / "study")
    assert store.resolve(f"file://{tmp_path}/x").path == str(tmp_path / "x")
    assert store.resolve(str(tmp_path), multi_node=True).uri == str(tmp_path)  # absolute: a mount every node may share
    with pytest.raises(store.StorageError, match="relative path"):
        store.resolve("results", multi_node=True)
    with pytest.raises(store.StorageError, match="unknown scheme ftp://"):
        store.resolve("ftp://host/x")


def test_a_bucket_location_reads_writes_lists_uploads_and_copies_down(bucket, tmp_path):
    loc = store.resolve(f"{bucket}/studies/")
    assert loc.remote and loc.uri == f"{bucket}/studies" and loc.path == f"{bucket[5:]}/studies"
    assert not loc.exists()
    store.check(loc)  # reachable, the bucket exists, writable
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
    with store.resolve(str(local)).local_copy() as same:
        assert same == local  # a local directory is used where it is


def test_eval_finds_the_newest_checkpoint_of_a_run_uri_or_a_studys_trial(bucket):
    run = store.resolve(f"{bucket}/st/study/train/train-abc_00001")
    for name in ("checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-02_00-00-00.000000"):
        (run / name / "ds" / "mp_rank_00_model_states.pt").write_text("x")
    (run / "checkpoint_2026-01-03_00-00-00.000000" / "partial.txt").write_text("no ds/ inside")  # not a checkpoint
    newest = "checkpoint_2026-01-02_00-00-00.000000"
    assert store.find_checkpoint(run.uri, "unused").name == newest
    assert store.find_checkpoint(f"{run.uri}/checkpoint_2026-01-01_00-00-00.000000", "unused").name.endswith("01-01_00-00-00.000000")
    assert store.find_checkpoint("study/abc_00001", f"{bucket}/st").uri == f"{run.uri}/{newest}"
    with pytest.raises(CheckpointError, match="nor a trial 'nope' of a study 'study'"):
        store.find_checkpoint("study/nope", f"{bucket}/st")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        store.find_checkpoint(f"{bucket}/st/study", "unused")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        store.find_checkpoint(f"{bucket}/nothing-here", "unused")


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
    assert store.resolve(bucket).children() == []


# ---------------------------------------------------------------------------------------------
# End to end: a study in a bucket, killed, resumed elsewhere, reported and evaluated from the bucket alone

STEPS = 30


def ercstudy(*args, cwd, env, **kw):
    return subprocess.run([sys.executable, "-m", "ercstudy", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=kw.pop("timeout", 600), **kw)


def listing(loc: store.Location) -> list[str]:
    return [i.path for i in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))]


def mc_task(root: Path) -> Path:
    """One lm-eval multiple-choice task from a local JSONL file (next line of the Shakespeare text)."""
    import json

    lines = [ln for ln in shakespeare_text().splitlines() if len(ln) > 20][:40]
    items = [{"context": lines[i], "choices": [lines[i + 1], lines[i + 7], lines[i + 13]], "gold": 0} for i in range(0, 24, 3)]
    (root / "mc.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "next_line.yaml").write_text(
        f"task: next_line\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    return tasks


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_study_in_a_bucket_survives_its_driver_and_its_working_directories(ray_session, bucket, shards, tmp_path):
    from mlflow.tracking import MlflowClient

    pytest.importorskip("lm_eval", reason="the `evals` extra (lm-evaluation-harness) is not installed")
    started = time.monotonic()
    outside = tmp_path / "outside"  # what a cluster keeps elsewhere: the MLflow store, the lm-eval task files
    outside.mkdir()
    uri = f"sqlite:///{outside}/mlflow.db"
    # the experiment with its artifacts beside the store (MLflow's default would be ./mlruns of the driver's directory)
    MlflowClient(uri).create_experiment("s3study", artifact_location=str(outside / "artifacts"))
    storage = f"{bucket}/studies"
    spec = {
        "name": "s3study", "storage": storage,  # the study's own storage: key (no --storage on `run`)
        "base": {"model": {"vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": SEQ},
                 "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
                 "train": {"tokens": STEPS * 8 * SEQ, "global_batch_size": 8, "micro_batch_size": 8, "lr": 0.01, "warmup_steps": 2,
                           "report_every": 5, "checkpoint_every": 10},
                 "data": {"kind": "parquet", "path": str(shards)},
                 "eval": {"every": 10, "sequences": 8, "mc_items": 0}},
        "search": {"sampler": "random", "num_trials": 2, "seed": 1, "params": {"erc.alpha": {"type": "float", "low": 0.5, "high": 1.2}}},
        "objective": {"metric": "eval/loss", "mode": "min"},
        "scheduler": {"type": "none"},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"uri": uri, "experiment": "s3study"},
    }
    (outside / "s3study.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    study = store.resolve(storage) / "s3study"
    work = [tmp_path / f"work{i}" for i in range(3)]  # a fresh working directory for each command
    for w in work:
        w.mkdir()

    # 1. the study, its driver killed (all of its process group) once a trial has a checkpoint in the bucket
    log = (tmp_path / "run.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "ercstudy", "run", str(outside / "s3study.yaml")], cwd=work[0], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed = None
    while driver.poll() is None and time.monotonic() - started < 300:
        files = listing(study)
        if any("/checkpoint_" in f for f in files) and any(Path(f).name.startswith("experiment_state") for f in files):
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            killed = time.monotonic() - started
            break
        time.sleep(0.5)
    log.close()
    assert killed is not None, f"no checkpoint in the bucket before the driver ended ({driver.returncode}):\n" + \
        (tmp_path / "run.log").read_text()[-3000:]
    assert {"study.yaml", "study.json"} <= set(study.children())
    assert list(work[0].iterdir()) == []  # nothing of the study on the local disk

    # 2. resumed from another working directory: from the bucket (Tune's state, the trials' checkpoints)
    resumed = ercstudy("resume", "s3study", "--storage", storage, cwd=work[1], env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"results: {storage}/s3study" in resumed.stdout
    assert list(work[1].iterdir()) == []
    resumed_at = time.monotonic() - started
    for w in work[:2]:
        shutil.rmtree(w)

    # 3. report and eval from the bucket alone
    report = ercstudy("report", "s3study", "--storage", storage, cwd=work[2], env=env)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert f"report written to {storage}/s3study/report" in report.stdout
    assert {"report.md", "leaderboard.csv", "fits.json", "loss_vs_compute.png"} <= set((study / "report").children())
    board = (study / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 3 and all(",completed," in row for row in board[1:]), board
    trial = board[1].split(",")[0]
    tasks = mc_task(outside)
    evaluated = ercstudy("eval", f"s3study/{trial}", "--storage", storage, "--tasks", "next_line", "--include-path", str(tasks),
                         "--batch-size", "8", cwd=work[2], env=env)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert "next_line" in evaluated.stdout and "acc" in evaluated.stdout
    assert list(work[2].iterdir()) == []

    # every trial in MLflow once, each step once, to the end
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("s3study").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(r.data.tags["ercstudy.status"] == "completed" for r in children)
    for r in children:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "lm_loss")]
        assert steps == list(range(5, STEPS + 1, 5)), steps
    print(f"\nstudy in a bucket: killed at {killed:.0f} s, resumed and finished at {resumed_at:.0f} s, "
          f"report + eval done at {time.monotonic() - started:.0f} s")
