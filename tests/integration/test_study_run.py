"""The quickstart study end to end, with its storage in a bucket: tests/integration/scenarios/study_in_bucket.py, in a
process of its own from the session's start (conftest), on a Ray of its own and the session's S3 server.

One run covers: Tune + Optuna trials of TorchTrainer workers (the quickstart's search, on Parquet shards of real
text), ASHA stopping trials early, the MLflow parent run with one nested child run per trial, the driver killed
(SIGKILL) once a trial had finished, `ercstudy resume` from a fresh working directory (no trial lost, none
duplicated in Tune, Optuna or MLflow, each step once), then `ercstudy report` and `ercstudy eval` from the bucket
alone with every earlier working directory deleted; nothing of the study on the local disk. The terminal shows
ercstudy's lines only, the summary last. Also: `ercstudy submit` to the shared local Ray's Jobs API.
"""


import pytest
from conftest import own_line

pytestmark = [pytest.mark.slow, pytest.mark.background("study_in_bucket", s3=True), pytest.mark.timeout(1800)]


def runs(scenario):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(scenario["uri"])
    all_runs = c.search_runs([c.get_experiment_by_name("quickstart").experiment_id], max_results=1000)
    return (c, [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in all_runs if "mlflow.parentRunId" in r.data.tags])


def failed(r: dict) -> str:
    return r["stdout"][-4000:] + r["stderr"][-4000:]


def test_resume_from_another_directory_finishes_the_study_and_nothing_is_on_the_local_disk(scenario):
    r = scenario["resumed"]
    assert r["exit"] == 0, failed(r)
    assert "leaderboard (eval/loss, min; best first)" in r["stdout"] and f"results: {scenario['storage']}/quickstart" in r["stdout"]
    assert "mlflow ui --backend-store-uri sqlite:///" in r["stdout"]
    assert {"study.yaml", "study.json"} <= set(scenario["study_files_after_kill"])
    assert scenario["work0_after_kill"] == [] and scenario["work1_after_resume"] == [] and scenario["work2_after"] == []


OWN_LINE = own_line("quickstart")  # every line `ercstudy run` / `resume` prints


def test_the_terminal_shows_ercstudy_lines_only_and_the_summary_last(scenario):
    r = scenario["resumed"]
    for name, text in (("run (killed)", scenario["first_log"]), ("resume", r["stdout"])):
        foreign = [line for line in text.splitlines() if not OWN_LINE.match(line)]
        assert not foreign, (name, foreign[:20])
    assert r["stderr"].strip() == "", r["stderr"][-3000:]  # nothing on stderr: no Ray or DeepSpeed line, no warning
    lines = r["stdout"].rstrip().splitlines()
    board = next(i for i, line in enumerate(lines) if line.startswith("leaderboard ("))
    assert not any(line.startswith("[quickstart]") for line in lines[board:])  # after the leaderboard: the summary only
    assert lines[-1].startswith("  then http://127.0.0.1:5000/#/experiments/"), lines[-5:]
    assert scenario["ray_logs_hold_driver_and_workers"]  # the logs the summary points at: the driver's and the workers'


def test_progress_says_how_each_trial_ended_without_ray_trains_report_dumps(scenario):
    log = scenario["first_log"] + scenario["resumed"]["stdout"] + scenario["resumed"]["stderr"]
    finished = [line for line in log.splitlines() if line.startswith("[quickstart] finished")]
    assert finished and all(line.split()[3] in ("completed", "stopped_early") for line in finished), finished
    assert "Reporting training result" not in log


def test_every_trial_is_one_nested_mlflow_run_none_lost_none_duplicated_each_step_once(scenario):
    c, parents, children = runs(scenario)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}
    trial_ids = [r.data.tags["ercstudy.trial_id"] for r in children]
    assert len(trial_ids) == scenario["trials"] and len(set(trial_ids)) == scenario["trials"], trial_ids
    # the runs that existed when the driver was killed are the same runs now (found again, not re-created)
    assert set(scenario["runs_before_kill"]) <= {r.info.run_id for r in children}
    for r in children:
        status = r.data.tags["ercstudy.status"]
        assert status in ("completed", "stopped_early"), (status, r.data.tags.get("ercstudy.note"))
        assert r.info.status == "FINISHED"  # stopped_early too: ASHA's decision, not a crash (ercstudy.note says so)
        for p in ("erc.alpha", "moe.num_experts", "moe.top_k", "train.lr"):
            assert f"search.{p}" in r.data.params and p in r.data.params
        assert float(r.data.params["moe.top_k"]) <= float(r.data.params["moe.num_experts"])  # the constraint
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "lm_loss")]
        assert steps == list(range(10, steps[-1] + 1, 10)), steps  # every step once, none lost, none logged twice
        for key in ("eval/loss", "alpha_star/layer0", "eps_mean/layer1", "domain_nmi", "erc_loss", "tokens_per_s"):
            assert key in r.data.metrics, key
        artifacts = {a.path for a in c.list_artifacts(r.info.run_id)} | {a.path for a in c.list_artifacts(r.info.run_id, "plots")}
        assert {"trial_config.yaml", "plots/specialization.png"} <= artifacts, artifacts
        if status == "completed":
            assert steps[-1] == 60 and {"coupling_matrices.json", "plots/coupling_matrices.png", "eval_table.json"} <= artifacts
    parent_artifacts = {a.path for a in c.list_artifacts(parent)}
    assert "leaderboard.csv" in parent_artifacts and "best/eval/loss" in c.get_run(parent).data.metrics
    assert c.get_run(parent).data.params["search.erc.alpha"] == "float [0.5, 1.2]"  # the space, readable


def test_asha_stopped_some_trials_early(scenario):
    _, _, children = runs(scenario)
    statuses = [r.data.tags["ercstudy.status"] for r in children]
    assert "stopped_early" in statuses and "completed" in statuses, statuses
    for r in children:
        if r.data.tags["ercstudy.status"] == "stopped_early":
            assert "stopped by ASHA" in r.data.tags["ercstudy.note"]


def test_tune_and_the_leaderboard_hold_each_trial_once(scenario):
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(f"{scenario['storage']}/quickstart")  # Tune's state, read from the bucket
    n = scenario["trials"]
    assert len(analysis.trials) == n and len({t.trial_id for t in analysis.trials}) == n
    assert len(scenario["leaderboard"].splitlines()) == 1 + n


def test_report_and_eval_from_the_bucket_alone(scenario):
    r = scenario["report"]
    assert r["exit"] == 0, failed(r)
    assert f"report written to {scenario['storage']}/quickstart/report" in r["stdout"]
    assert {"report.md", "leaderboard.csv", "fits.json", "objective_vs_params.png", "loss_vs_compute.png"} <= set(scenario["report_files"])
    # best alpha per expert count, at equal other searched params (a group per combination, report.py)
    fits = scenario["fits"]
    assert fits["best_alpha"] and {k.split(",")[0] for k in fits["best_alpha"]} <= {"experts=4", "experts=8"}
    e = scenario["eval"]
    assert e["exit"] == 0, failed(e)
    assert "next_line" in e["stdout"] and "acc" in e["stdout"]
    print(f"study: killed at {scenario['killed_at_s']:.0f} s, resumed and finished at {scenario['resumed_at_s']:.0f} s, "
          f"report and eval at {scenario['elapsed_s']:.0f} s")
