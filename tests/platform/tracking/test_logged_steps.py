"""LoggedSteps and the MLflow callbacks: each report reaches MLflow as it arrives, each step once."""

from ercstudy.platform.tracking import client as tracking
from ercstudy.platform.tracking.callbacks import MLflowTrainCallback
from ercstudy.platform.tracking.logged_steps import LoggedSteps


def report(step, value, total=40):
    return {"step": step, "total_steps": total, "lm_loss": value}


def test_a_report_is_logged_as_it_arrives_and_a_restarts_repeats_are_not():
    s = LoggedSteps()
    assert [r["step"] for r in s.new(report(10, 1.0))] == [10]  # no checkpoint needed
    assert [r["step"] for r in s.new(report(20, 0.9))] == [20]
    assert [r["step"] for r in s.new(report(30, 0.8))] == [30]  # then the worker dies; the last checkpoint was at 20
    assert s.new(report(30, 0.79)) == []  # the group restarted from step 20 repeats 30: the curve keeps the first
    assert [(r["step"], r["lm_loss"]) for r in s.new(report(40, 0.6))] == [(40, 0.6)]


def test_steps_already_in_mlflow_are_not_logged_again():
    s = LoggedSteps(logged=20)  # a resumed driver: the run holds steps up to 20
    assert s.new(report(20, 0.9)) == []
    assert [r["step"] for r in s.new(report(30, 0.8))] == [30]


def test_a_restored_checkpoint_brings_the_reports_a_dead_driver_never_logged():
    """The driver died after Ray Train had the step-30 checkpoint and before it logged steps 20 and 30: the new
    driver's run holds up to step 10; the worker's first report after the restore carries the checkpoint's reports."""
    s = LoggedSteps(logged=10)
    history = [report(10, 1.0), report(20, 0.9), report(30, 0.8)]
    assert [r["step"] for r in s.restored(history, upto=30)] == [20, 30]
    assert [r["step"] for r in s.new({**report(40, 0.7), "resumed_from_step": 30})] == [40]
    assert s.restored(history, upto=30) == []  # a second restore from the same checkpoint: nothing twice
    fresh = LoggedSteps(logged=30)  # a worker restart within the same driver: it logged them already
    assert fresh.restored(history, upto=30) == []


def test_the_train_callback_logs_a_report_before_any_checkpoint_into_a_real_store(tmp_path):
    """Live curves: the step is in MLflow as soon as Ray Train hands the report over, with no checkpoint; a
    restarted group's repeat of it changes nothing."""
    uri = tracking.resolve_uri(f"sqlite:///{tmp_path}/mlflow.db")
    c = tracking.client(uri)
    run_id = c.create_run(c.create_experiment("live")).info.run_id
    callback = MLflowTrainCallback(uri, run_id)
    callback.after_report(None, [report(5, 2.0)], None)
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "lm_loss")] == [(5, 2.0)]
    callback.after_report(None, [report(10, 1.5)], None)
    callback.after_report(None, [report(10, 1.4)], None)  # repeated after a restart from an earlier checkpoint
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "lm_loss")] == [(5, 2.0), (10, 1.5)]
