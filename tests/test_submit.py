"""`ercstudy submit` to the Jobs API of the shared local Ray (a cluster's head serves the same API). A cluster that
autoscales from zero for the submitted study: tests/test_autoscaling.py."""

import os
import time
from pathlib import Path

import pytest
import yaml
from conftest import own_line

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]
REPO = Path(__file__).resolve().parents[1]
OWN_LINE = own_line("submitted")


def test_submit_runs_a_study_as_a_ray_job(ray_session, tmp_path, monkeypatch, capsys):
    """`ercstudy submit` to the Jobs API of the shared local Ray (a cluster's head serves the same API): the job's
    log holds ercstudy's lines only, the summary last. (A cluster's autoscaling from zero: test_autoscaling.py.)"""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ercstudy.platform.cli import main
    from ercstudy.platform.ray_runtime import local_dashboard_url

    url = local_dashboard_url()
    assert url, "the shared Ray of the tests is a local instance"
    data = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    data["name"] = "submitted"
    data["base"]["train"]["tokens"] = 10 * 16 * 64  # 10 steps
    data["search"] = {"sampler": "random", "num_trials": 1, "seed": 1, "params": {"erc.alpha": {"type": "float", "low": 0.5, "high": 1.2}}}
    data["scheduler"] = {"type": "none"}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data["tracking"] = {"uri": uri, "experiment": "submitted"}
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "submitted.yaml").write_text(yaml.safe_dump(data))
    MlflowClient(uri).search_experiments()  # the store's tables, before the job's driver opens it
    monkeypatch.chdir(tmp_path)
    job_id = f"ercstudy-test-{os.getpid()}"
    code = main(["submit", "search_spaces/submitted.yaml", "--address", url, "--job-id", job_id, "--storage", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert code == 0 and f"as Ray job {job_id}" in out and "ray job logs --follow" in out, out
    client = JobSubmissionClient(url)
    deadline = time.monotonic() + 1200
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.monotonic() < deadline:
        time.sleep(3)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "leaderboard (eval/loss, min; best first)" in logs
    assert logs.rstrip().splitlines()[-1].startswith("  then http://127.0.0.1:5000/"), logs[-2000:]  # the job's last line
    # the job's log opens with the lines of Ray's job manager, written before the entrypoint starts
    lines = logs.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Running entrypoint for job")) + 1
    assert all("job_manager.py" in line for line in lines[: start - 1]), lines[:start]
    foreign = [line for line in lines[start:] if not OWN_LINE.match(line)]
    assert not foreign, foreign[:20]
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("submitted").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1
    assert children[0].data.tags["ercstudy.status"] == "completed" and "eval/loss" in children[0].data.metrics
    assert (tmp_path / "results" / "submitted" / "leaderboard.csv").is_file()
