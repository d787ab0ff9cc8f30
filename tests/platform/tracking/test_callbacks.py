"""MLflow logging against a real SQLite store: the Train callback of `ercstudy train`, statuses, artifacts."""

from pathlib import Path

import pytest

from ercstudy.platform.tracking import client as tracking
from ercstudy.platform.tracking.callbacks import MLflowTrainCallback


@pytest.fixture()
def store(tmp_path):
    uri = tracking.resolve_uri(f"sqlite:///{tmp_path}/mlflow.db")
    c = tracking.client(uri)
    return uri, c, tracking.experiment_id(c, "t")


def report(step, total=30, **extra):
    m = {"step": step, "total_steps": total, "tokens": step * 512, "lm_loss": 5.0 - step / 10, "eval/loss": 5.1 - step / 10,
         "alpha_star": 0.5, "alpha_star/layer0": 0.4, "alpha_star/layer1": 0.6, "eps_mean/layer0": 0.7, "eps_mean/layer1": 0.6,
         "eps_mean": 0.65, "domain_nmi/layer0": step / 100, "domain_nmi/layer1": step / 50, "domain_nmi": step / 75, "flag": True}
    return {**m, **extra}


def test_train_callback_logs_each_report_at_its_step_and_the_run_ends_with_artifacts(store):
    uri, c, exp = store
    run_id = tracking.start_trial_run(c, exp, name="trial", config={"erc": {"alpha": 0.8}, "moe": {"num_experts": 4}},
                                      params={"erc.alpha": 0.8})
    cb = MLflowTrainCallback(uri, run_id)
    for step in (10, 20):
        cb.after_report(None, [report(step)], None)
    final = report(30, coupling_matrix=[[[0.5, 0.1], [0.2, 0.4]], [[0.3, 0.1], [0.1, 0.3]]], stop_reason=None)
    cb.after_report(None, [final], None)
    history = c.get_metric_history(run_id, "lm_loss")
    assert sorted((m.step, m.value) for m in history) == [(10, 4.0), (20, 3.0), (30, 2.0)]
    run = c.get_run(run_id)
    assert "coupling_matrix" not in run.data.metrics and "flag" not in run.data.metrics and "step" not in run.data.metrics
    assert run.data.params["erc.alpha"] == "0.8" and run.data.params["search.erc.alpha"] == "0.8"

    tracking.finish_trial_run(c, run_id, tracking.trial_status(final, 30), final)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.STATUS_TAG] == "completed"
    paths = {a.path for a in c.list_artifacts(run_id)} | {a.path for a in c.list_artifacts(run_id, "plots")}
    assert {"trial_config.yaml", "coupling_matrices.json", "eval_table.json", "plots/specialization.png",
            "plots/coupling_matrices.png"} <= paths, paths


def test_trial_status():
    assert tracking.trial_status(report(30), 30) == "completed"
    assert tracking.trial_status(report(20), 30) == "stopped_early"
    assert tracking.trial_status(report(20, stop_reason="non-finite loss"), 30) == "stopped_nonfinite"
    assert tracking.trial_status(report(30), 30, error=True) == "failed"


@pytest.mark.parametrize("final,error,status,mlflow_status", [
    (report(20), False, "stopped_early", "FINISHED"),  # ASHA's decision: the trial ended as planned
    (report(20, stop_reason="non-finite loss"), False, "stopped_nonfinite", "FAILED"),
    (report(30), True, "failed", "FAILED"),
])
def test_a_run_ends_in_the_mlflow_status_of_how_its_trial_ended(store, final, error, status, mlflow_status):
    _, c, exp = store
    run_id = tracking.start_trial_run(c, exp, name="trial", config={"erc": {"alpha": 0.8}})
    tracking.finish_trial_run(c, run_id, tracking.trial_status(final, 30, error=error), final, note="why")
    run = c.get_run(run_id)
    assert (run.data.tags[tracking.STATUS_TAG], run.info.status) == (status, mlflow_status)
    assert run.data.tags["ercstudy.note"] == "why"


def test_a_failing_store_does_not_stop_training(tmp_path, capsys):
    cb = MLflowTrainCallback(f"sqlite:///{tmp_path}/missing/dir/mlflow.db", "no-such-run")
    cb.after_report(None, [report(10)], object())  # a checkpointed report is logged at once; no exception: training goes on
    assert "MLflow logging failed at step 10" in capsys.readouterr().out


def test_experiments_open_in_the_model_training_view_of_the_ui(store):
    _, c, exp = store
    assert c.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    other = c.create_experiment("made-by-hand")  # an experiment without the tag gets it; a user's own choice stays
    assert tracking.experiment_id(c, "made-by-hand") == other
    assert c.get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"
    c.set_experiment_tag(other, "mlflow.experimentKind", "finetuning")
    tracking.experiment_id(c, "made-by-hand")
    assert c.get_experiment(other).tags["mlflow.experimentKind"] == "finetuning"


def test_a_new_sqlite_store_says_nothing_on_the_terminal(tmp_path, capfd):
    c = tracking.client(f"sqlite:///{tmp_path}/new.db")
    c.search_experiments()  # creates and migrates the store
    out, err = capfd.readouterr()
    assert (tmp_path / "new.db").is_file() and "database tables" not in out + err, out + err


def test_run_lookups_survive_quotes_in_run_paths(store):
    _, c, exp = store
    path = "/home/o'brien/ercstudy_results/my run"  # `ercstudy train` tags a run with its directory
    run = c.create_run(exp, tags={tracking.TRIAL_TAG: path})
    found = c.search_runs([exp], filter_string=tracking.tag_filter(**{tracking.TRIAL_TAG: path}))
    assert [r.info.run_id for r in found] == [run.info.run_id]
    with pytest.raises(tracking.TrackingError, match="both quote characters"):
        tracking.filter_value("""it's "odd\"""")


def test_every_run_records_the_code_it_ran(store):
    """ercstudy's version, and (tests run from the checkout) its git commit and whether the tree had changes."""
    import subprocess

    import ercstudy

    _, c, exp = store
    run_id = tracking.start_trial_run(c, exp, name="trial", config={"erc": {"alpha": 0.8}})
    tags = c.get_run(run_id).data.tags
    root = Path(ercstudy.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert tags[tracking.VERSION_TAG] == ercstudy.__version__ and tags[tracking.COMMIT_TAG] == head
    assert tags[tracking.DIRTY_TAG] in ("true", "false")
    assert "trial_config.yaml" in {a.path for a in c.list_artifacts(run_id)}  # the resolved config it trained
