"""A tracking server that may fail, end to end, set up as a cluster's: a real `mlflow server` on loopback with its
store in a real PostgreSQL and its artifacts in an S3 bucket (served), and the study's Optuna study in PostgreSQL
too. One study of 3 trials at once (a multi-objective one) logs through it, and the server is stopped mid-study for
longer than the driver's retries and started again on the same port: the study trains on, says so, and MLflow ends
with every trial's every step once and its artifacts. Then that server goes for good, as a cluster's head does at
`ray down`, and a fresh server on the same database and bucket shows every run, step and artifact.
(The outbox's units, without a server: tests/platform/tracking/test_outbox.py.)
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from postgres_server import PASSWORD

from ercstudy.netutil import free_port
from ercstudy.platform.study.optuna_store import DATABASE_ENV, read_study
from ercstudy.platform.tracking import client as tracking

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# End to end: a real `mlflow server` on loopback

TRIALS = 3


class Server:
    """`mlflow server` on one loopback port over a backend store (`store`: a database URL) with its artifacts served
    from `artifacts` (a bucket): stopped and started again on the same port, over the same store."""

    def __init__(self, root: Path, store: str, artifacts: str):
        self.root, self.port, self.store, self.artifacts = root, free_port(), store, artifacts
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = root / "server.log"

    def start(self, timeout_s: float = 120) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner (GenAI jobs): 8 fewer processes
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store,
                 "--serve-artifacts", "--artifacts-destination", self.artifacts, "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"mlflow server did not start on {self.uri}:\n{self.log.read_text()[-2000:]}", pytrace=False)
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres, s3_server):
    """The cluster's setup (cluster.yaml, docs/clusters.md): the store in PostgreSQL, the artifacts in a bucket."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="mlflow-artifacts")
    s = Server(tmp_path_factory.mktemp("mlflow-server"), postgres.create_database("mlflow"), "s3://mlflow-artifacts/mlflow")
    s.start()
    yield s
    s.stop()


def spec(name: str, uri: str, steps: int) -> dict:
    """3 tiny trials at once: half a CPU each (the shared test Ray has 2)."""
    return {
        "name": name,
        "base": {"model": {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32},
                 "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
                 "train": {"tokens": steps * 8 * 32, "global_batch_size": 8, "micro_batch_size": 8, "lr": 0.005,
                           "warmup_steps": 2, "report_every": 5, "checkpoint_every": 10, "seed": 3},
                 "data": {"num_domains": 4, "tokens_per_domain": 16, "shared_tokens": 16},
                 "eval": {"every": 10, "sequences": 8, "mc_items": 0}},
        "search": {"sampler": "random", "num_trials": TRIALS, "seed": 1,
                   "params": {"erc.alpha": {"type": "float", "low": 0.5, "high": 1.2}}},
        "objective": [{"metric": "eval/loss", "mode": "min"}, {"metric": "tokens_per_s", "mode": "max"}],
        "scheduler": {"type": "none"},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
        "tracking": {"uri": uri, "experiment": name},
    }


def start_study(name: str, server: Server, ray_session, tmp_path: Path, steps: int, optuna_db: str) -> tuple[subprocess.Popen, Path]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec(name, server.uri, steps)))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO),
           DATABASE_ENV: optuna_db}
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ercstudy", "run", str(path), "--storage", str(tmp_path / "results")],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def finished(proc: subprocess.Popen, log: Path, timeout_s: float = 400) -> str:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def check_mlflow(server: Server, name: str, driver_log: str, steps: int) -> list:
    """Every trial's every step once (each metric), its artifacts, the parent's; no 'database is locked'. Returns the
    trials' runs."""
    from conftest import TRIAL_METRICS
    from mlflow.tracking import MlflowClient

    c = MlflowClient(server.uri)
    runs = c.search_runs([c.get_experiment_by_name(name).experiment_id], max_results=100)
    parents = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
    children = [r for r in runs if tracking.PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == TRIALS and len({r.data.tags[tracking.TRIAL_TAG] for r in children}) == TRIALS
    assert {"study.yaml", "leaderboard.csv"} <= {a.path for a in c.list_artifacts(parents[0].info.run_id)}
    for r in children:
        assert r.data.tags[tracking.STATUS_TAG] == "completed" and r.info.status == "FINISHED", r.data.tags
        for key in [*TRIAL_METRICS, "eval/loss"]:
            logged = [m.step for m in c.get_metric_history(r.info.run_id, key)]
            want = list(range(10, steps + 1, 10)) if key == "eval/loss" else list(range(5, steps + 1, 5))
            assert sorted(logged) == want, (r.data.tags[tracking.TRIAL_TAG], key, logged)
        paths = {a.path for a in c.list_artifacts(r.info.run_id)} | {a.path for a in c.list_artifacts(r.info.run_id, "plots")}
        assert {"trial_config.yaml", "coupling_matrices.json", "eval_table.json", "plots/specialization.png",
                "plots/coupling_matrices.png"} <= paths, paths
    assert "database is locked" not in server.log.read_text() + driver_log
    return children


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_three_trials_at_once_train_through_a_tracking_server_outage(server, postgres, ray_session, tmp_path, monkeypatch):
    """One study does it all: 3 trials at once through the server, the server stopped mid-study for longer than the
    driver's retries, then started again on the same port; its Optuna study in PostgreSQL; at the end the server
    gone for good and a fresh one on the same database and bucket showing everything. Its objective is two
    metrics (a Pareto front), as a cluster study's may be."""
    from mlflow.tracking import MlflowClient

    optuna_db = postgres.create_database("optuna")
    started = time.monotonic()
    proc, log = start_study("outage", server, ray_session, tmp_path, steps=30, optuna_db=optuna_db)
    # stop the server once the study's parent run exists, as its trials start (their runs are made once it is back),
    # for longer than the driver's retries (~2 s)
    c = MlflowClient(server.uri)
    while proc.poll() is None and time.monotonic() - started < 300:
        exp = c.get_experiment_by_name("outage")
        if exp and c.search_runs([exp.experiment_id]):
            break
        time.sleep(0.2)
    assert proc.poll() is None, log.read_text()[-3000:]
    server.stop()
    stopped = time.monotonic()
    time.sleep(10)  # 5x the driver's retries for one call; its next try comes up to 15 s later
    # and down until the driver has met the outage: on a busy machine its trials (whose MLflow runs it makes) may
    # start later than 10 s from here, and a server back before any call would test nothing
    while "is not answering; buffering to" not in log.read_text() and proc.poll() is None and time.monotonic() - stopped < 240:
        time.sleep(0.5)
    server.start()
    back = time.monotonic()
    text = finished(proc, log)
    assert f"study outage: {TRIALS} trials = ({TRIALS} point(s)) x 1 seed(s), up to {TRIALS} at once" in text, text[-3000:]
    down = [ln for ln in text.splitlines() if "is not answering; buffering to" in ln]
    again = [ln for ln in text.splitlines() if "answers again; wrote the" in ln]
    assert len(down) == 1 and len(again) == 1, text[-4000:]
    lines = text.splitlines()
    board = next(i for i, ln in enumerate(lines) if ln.startswith("leaderboard ("))
    assert lines.index(again[0]) < board, text[-4000:]  # written back in Tune's loop, before the study ended
    assert lines[board].startswith("leaderboard (Pareto front of eval/loss min, tokens_per_s max first"), lines[board]
    assert down[0].startswith(f"ercstudy: MLflow at {server.uri} is not answering; buffering to {tmp_path}/results/outage/mlflow-outbox/")
    assert "View run" not in text  # the terminal: ercstudy's lines
    check_mlflow(server, "outage", text, steps=30)
    assert not (tmp_path / "results" / "outage" / "mlflow-outbox").exists()
    # all three trained at once: each trial's first step was logged before any trial's last (the buffered metrics keep
    # the time they were reported at)
    exp = c.get_experiment_by_name("outage")
    runs = c.search_runs([exp.experiment_id])
    children = [r for r in runs if tracking.PARENT_TAG in r.data.tags]
    stamps = [[m.timestamp for m in c.get_metric_history(r.info.run_id, "lm_loss")] for r in children]
    assert max(min(s) for s in stamps) < min(max(s) for s in stamps), stamps
    parent = next(r for r in runs if tracking.PARENT_TAG not in r.data.tags)
    pareto = parent.data.tags["ercstudy.pareto_trials"].split()
    assert 1 <= len(pareto) <= TRIALS and set(pareto) <= {r.data.tags[tracking.TRIAL_TAG] for r in children}
    # the Optuna study is in PostgreSQL (optuna.json says so, without the password); the report's reader finds it
    marker = (tmp_path / "results" / "outage" / "optuna.json").read_text()
    assert postgres.url("optuna").replace(PASSWORD, "***") in marker and PASSWORD not in marker
    assert not (tmp_path / "results" / "outage" / "optuna.db").exists()
    monkeypatch.setenv(DATABASE_ENV, optuna_db)
    with read_study(str(tmp_path / "results" / "outage"), "outage") as optuna_study:
        assert optuna_study.study_name == f"outage@{tmp_path}/results/outage"
        assert [t.state.name for t in optuna_study.trials] == ["COMPLETE"] * TRIALS
    # the head goes (`ray down`: the server and its working directory): a fresh server on the same database and
    # bucket shows every run, step and artifact, and the study's report is written through it
    server.stop()
    shutil.rmtree(server.root)
    fresh = Server(tmp_path, server.store, server.artifacts)
    fresh.start()
    try:
        assert {r.info.run_id for r in check_mlflow(fresh, "outage", text, steps=30)} == {r.info.run_id for r in children}
        report = subprocess.run([sys.executable, "-m", "ercstudy", "report", "outage", "--storage", str(tmp_path / "results"),
                                 "--tracking-uri", fresh.uri], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONPATH": str(REPO), DATABASE_ENV: optuna_db})
        assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
        assert f"outage@{tmp_path}/results/outage" in (tmp_path / "results" / "outage" / "report" / "report.md").read_text()
    finally:
        fresh.stop()
    print(f"\noutage study ({TRIALS} trials at once): server stopped at {stopped - started:.0f} s for {back - stopped:.0f} s, "
          f"study done at {time.monotonic() - started:.0f} s; {down[0]}\n{again[0]}")
