"""The quickstart study end to end on the shared local Ray with a real MLflow SQLite store.

One run covers: Tune + Optuna trials of TorchTrainer workers, ASHA stopping trials early, the
MLflow parent run with one nested child run per trial, and `ercstudy resume` after the driver
was killed (SIGKILL) once a trial had finished: no trial lost, none duplicated in Tune, Optuna
or MLflow. `ercstudy report` then reads the study back from MLflow. The terminal shows
ercstudy's lines only, the summary last.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.ray,
    pytest.mark.timeout(3600),
    pytest.mark.slow,  # a whole study (several TorchTrainer runs) twice: minutes
]
REPO = Path(__file__).resolve().parents[1]
TRIALS = 4


def ercstudy(*args, env, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "ercstudy", *args], env=env, cwd=cwd, start_new_session=True,
                            stdout=kw.pop("stdout", None), stderr=subprocess.STDOUT, **kw)


def child_runs(uri):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("quickstart")
    if exp is None:
        return c, [], []
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return c, parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.fixture(scope="module")
def study(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri,
           "PYTHONPATH": str(REPO)}
    spec = REPO / "search_spaces" / "quickstart.yaml"
    storage = tmp / "results"
    # create the store's tables now: the first MlflowClient of a new SQLite file migrates it, and
    # the driver's and this test's polling client migrating at once collide in alembic_version
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments()
    log = (tmp / "run.log").open("w")
    started = time.monotonic()
    driver = ercstudy("run", str(spec), "--storage", str(storage), env=env, cwd=tmp, stdout=log)
    # kill the driver (all of its process group) as soon as one trial has finished
    killed_after = None
    while driver.poll() is None and time.monotonic() - started < 1500:
        _, _, children = child_runs(uri) if (tmp / "mlflow.db").exists() else (None, [], [])
        if any(r.data.tags.get("ercstudy.status") not in (None, "running") for r in children):
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            killed_after = time.monotonic() - started
            break
        time.sleep(2)
    log.close()
    first_log = (tmp / "run.log").read_text()
    assert killed_after is not None, f"no trial finished (driver exit {driver.returncode}):\n{first_log[-3000:]}"
    _, _, before = child_runs(uri)
    time.sleep(5)  # Ray frees the killed driver's actors and placement groups
    resumed = subprocess.run([sys.executable, "-m", "ercstudy", "resume", "quickstart", "--storage", str(storage)],
                             env=env, cwd=tmp, capture_output=True, text=True, timeout=1800)
    report = subprocess.run([sys.executable, "-m", "ercstudy", "report", "quickstart", "--storage", str(storage)],
                            env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    return {"uri": uri, "storage": storage, "before": before, "first_log": first_log, "resumed": resumed, "report": report,
            "elapsed": time.monotonic() - started}


def test_resume_finishes_the_study(study):
    r = study["resumed"]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "leaderboard (eval/loss, min; best first)" in r.stdout and "mlflow ui --backend-store-uri sqlite:///" in r.stdout


# every line `ercstudy run` / `resume` prints: the header, the trials' table, finished trials, the summary
OWN_LINE = re.compile(r"^(|study quickstart: .*|MLflow: .*|Ray's logs.*|\[quickstart\] .*|  \S.*|leaderboard \(.*|results: .*)$")


def test_the_terminal_shows_ercstudy_lines_only_and_the_summary_last(study):
    r = study["resumed"]
    for name, text in (("run (killed)", study["first_log"]), ("resume", r.stdout)):
        foreign = [line for line in text.splitlines() if not OWN_LINE.match(line)]
        assert not foreign, (name, foreign[:20])
    assert r.stderr.strip() == "", r.stderr[-3000:]  # nothing on stderr: no Ray or DeepSpeed line, no warning
    lines = r.stdout.rstrip().splitlines()
    board = next(i for i, line in enumerate(lines) if line.startswith("leaderboard ("))
    assert not any(line.startswith("[quickstart]") for line in lines[board:])  # after the leaderboard: the summary only
    assert lines[-1].startswith("  then http://127.0.0.1:5000/#/experiments/"), lines[-5:]
    logs = next(line for line in lines if line.startswith("Ray's logs (workers, DeepSpeed): ")).split(": ", 1)[1].split(" on this node")[0]
    assert (Path(logs) / "ercstudy-driver.log").is_file() and any(Path(logs).glob("worker-*.out")), logs


def test_progress_says_how_each_trial_ended_without_ray_trains_report_dumps(study):
    log = study["first_log"] + study["resumed"].stdout + study["resumed"].stderr
    finished = [line for line in log.splitlines() if line.startswith("[quickstart] finished")]
    assert finished and all(line.split()[3] in ("completed", "stopped_early") for line in finished), finished
    assert "Reporting training result" not in log


def test_every_trial_is_one_nested_mlflow_run_none_lost_none_duplicated(study):
    c, parents, children = child_runs(study["uri"])
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}
    trial_ids = [r.data.tags["ercstudy.trial_id"] for r in children]
    assert len(trial_ids) == TRIALS and len(set(trial_ids)) == TRIALS, trial_ids
    # the runs that existed when the driver was killed are the same runs now (found again, not re-created)
    assert {r.info.run_id for r in study["before"]} <= {r.info.run_id for r in children}
    for r in children:
        status = r.data.tags["ercstudy.status"]
        assert status in ("completed", "stopped_early"), (status, r.data.tags.get("ercstudy.note"))
        assert r.info.status == ("FINISHED" if status == "completed" else "KILLED")
        for p in ("erc.alpha", "moe.num_experts", "moe.top_k", "train.lr"):
            assert f"search.{p}" in r.data.params and p in r.data.params
        assert float(r.data.params["moe.top_k"]) <= float(r.data.params["moe.num_experts"])  # the constraint
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "lm_loss")]
        assert steps == sorted(set(steps)) and steps[0] == 10, steps  # one value per step, no step logged twice
        for key in ("eval/loss", "alpha_star/layer0", "eps_mean/layer1", "domain_nmi", "erc_loss", "tokens_per_s"):
            assert key in r.data.metrics, key
        artifacts = {a.path for a in c.list_artifacts(r.info.run_id)} | {a.path for a in c.list_artifacts(r.info.run_id, "plots")}
        assert {"trial_config.yaml", "plots/specialization.png"} <= artifacts, artifacts
        if status == "completed":
            assert steps[-1] == 60 and {"coupling_matrices.json", "plots/coupling_matrices.png", "eval_table.json"} <= artifacts
    parent_artifacts = {a.path for a in c.list_artifacts(parent)}
    assert "leaderboard.csv" in parent_artifacts and "best/eval/loss" in c.get_run(parent).data.metrics
    assert c.get_run(parent).data.params["search.erc.alpha"] == "float [0.5, 1.2]"  # the space, readable


def test_asha_stopped_some_trials_early(study):
    _, _, children = child_runs(study["uri"])
    statuses = [r.data.tags["ercstudy.status"] for r in children]
    assert "stopped_early" in statuses and "completed" in statuses, statuses
    for r in children:
        if r.data.tags["ercstudy.status"] == "stopped_early":
            assert "stopped by ASHA" in r.data.tags["ercstudy.note"]


def test_tune_and_optuna_hold_each_trial_once(study):
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(study["storage"] / "quickstart"))
    assert len(analysis.trials) == TRIALS and len({t.trial_id for t in analysis.trials}) == TRIALS
    board = (study["storage"] / "quickstart" / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 1 + TRIALS


def test_report_from_mlflow(study):
    r = study["report"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = study["storage"] / "quickstart" / "report"
    assert {"report.md", "leaderboard.csv", "fits.json", "objective_vs_params.png", "loss_vs_compute.png"} <= {p.name for p in out.iterdir()}
    fits = yaml.safe_load((out / "fits.json").read_text())
    # best alpha per expert count, at equal other searched params (a group per combination, report.py)
    assert fits["best_alpha"] and {k.split(",")[0] for k in fits["best_alpha"]} <= {"experts=4", "experts=8"}
    print(f"study: {study['elapsed']:.0f} s including the kill and the resume")


def test_submit_runs_a_multi_objective_study_as_a_ray_job(ray_session, tmp_path, monkeypatch, capsys):
    """`ercstudy submit` to the Jobs API of the shared local Ray (a cluster's head serves the same API)."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ercstudy.platform.cli import main
    from ercstudy.platform.ray_runtime import local_dashboard_url

    url = local_dashboard_url()
    assert url, "the shared Ray of the tests is a local instance"
    data = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    data["name"] = "submitted"
    data["base"]["train"]["tokens"] = 20 * 16 * 64  # 20 steps
    data["search"] = {"sampler": "random", "num_trials": 2, "seed": 1, "params": {"erc.alpha": {"type": "float", "low": 0.5, "high": 1.2}}}
    data["objective"] = [{"metric": "eval/loss", "mode": "min"}, {"metric": "tokens_per_s", "mode": "max"}]
    data["scheduler"] = {"type": "none"}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data["tracking"] = {"uri": uri, "experiment": "submitted"}
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "submitted.yaml").write_text(yaml.safe_dump(data))
    MlflowClient(uri).search_experiments()  # the store's tables, before the job's driver opens it
    monkeypatch.chdir(tmp_path)
    job_id = f"ercstudy-test-{os.getpid()}"
    deadline = time.monotonic() + 120
    while (code := main(["submit", "search_spaces/submitted.yaml", "--address", url, "--job-id", job_id,
                         "--storage", str(tmp_path / "results")])) != 0 and time.monotonic() < deadline:
        time.sleep(5)  # the dashboard's job API may still be starting
    out = capsys.readouterr().out
    assert code == 0 and f"as Ray job {job_id}" in out and "ray job logs --follow" in out, out
    client = JobSubmissionClient(url)
    deadline = time.monotonic() + 1200
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.monotonic() < deadline:
        time.sleep(3)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "leaderboard (Pareto front of eval/loss min, tokens_per_s max first" in logs
    assert logs.rstrip().splitlines()[-1].startswith("  then http://127.0.0.1:5000/"), logs[-2000:]  # the job's last line
    # the job's log opens with the lines of Ray's job manager, written before the entrypoint starts
    lines = logs.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Running entrypoint for job")) + 1
    assert all("job_manager.py" in line for line in lines[: start - 1]), lines[:start]
    foreign = [line for line in lines[start:] if not OWN_LINE.match(line.replace("submitted", "quickstart"))]
    assert not foreign, foreign[:20]
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("submitted").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.data.tags["ercstudy.status"] == "completed" and "tokens_per_s" in r.data.metrics for r in children)
    pareto = parents[0].data.tags["ercstudy.pareto_trials"].split()
    assert 1 <= len(pareto) <= 2 and set(pareto) <= {r.data.tags["ercstudy.trial_id"] for r in children}
    assert (tmp_path / "results" / "submitted" / "leaderboard.csv").is_file()
