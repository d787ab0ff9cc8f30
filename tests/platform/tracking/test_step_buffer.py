"""StepBuffer: each step reaches MLflow once, with the values of the attempt that continued."""

from ercstudy.platform.tracking.step_buffer import StepBuffer


def report(step, value, total=40):
    return {"step": step, "total_steps": total, "lm_loss": value}


def test_a_restart_replaces_the_reports_after_the_last_checkpoint():
    b = StepBuffer()
    assert b.add(report(10, 1.0), checkpointed=False) == []
    assert [r["step"] for r in b.add(report(20, 0.9), checkpointed=True)] == [10, 20]
    assert b.add(report(30, 0.8), checkpointed=False) == []  # then the worker dies
    b.add(report(30, 0.7), checkpointed=False)  # the group restarted from step 20 reports 30 again
    released = b.add(report(40, 0.6), checkpointed=True)
    assert [(r["step"], r["lm_loss"]) for r in released] == [(30, 0.7), (40, 0.6)]


def test_the_last_report_and_the_end_release_everything_once():
    b = StepBuffer()
    b.add(report(10, 1.0, total=20), checkpointed=False)
    assert [r["step"] for r in b.add(report(20, 0.9, total=20), checkpointed=False)] == [10, 20]  # the last step
    b.add(report(30, 0.5, total=90), checkpointed=False)
    stopped = b.add({**report(40, float("nan"), total=90), "stop_reason": "non-finite"}, checkpointed=False)
    assert [r["step"] for r in stopped] == [30, 40]  # a stopping report is the last one
    assert b.flush() == []


def test_steps_already_in_mlflow_are_not_released_again():
    b = StepBuffer(logged=20)  # a resumed driver: the run holds steps up to 20
    assert [r["step"] for r in b.add(report(20, 0.9), checkpointed=True)] == []
    b.add(report(30, 0.8), checkpointed=False)
    assert [r["step"] for r in b.flush()] == [30]  # the trial ended (ASHA, an error): released at the end


def test_a_restored_checkpoint_brings_the_reports_a_dead_driver_never_logged():
    """The driver died after Ray Train had the step-30 checkpoint and before it logged steps 20 and 30: the new
    driver's run holds up to step 10; the worker's first report after the restore carries the checkpoint's reports."""
    b = StepBuffer(logged=10)
    history = [report(10, 1.0), report(20, 0.9), report(30, 0.8)]
    assert [r["step"] for r in b.restored(history, upto=30)] == [20, 30]
    assert [r["step"] for r in b.add({**report(40, 0.7), "resumed_from_step": 30}, checkpointed=True)] == [40]
    assert b.restored(history, upto=30) == []  # a second restore from the same checkpoint: nothing twice
    fresh = StepBuffer(logged=30)  # a worker restart within the same driver: it logged them already
    assert fresh.restored(history, upto=30) == []
