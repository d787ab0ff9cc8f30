"""The Ray Train callbacks of `ercstudy train`: they run in the Train controller, not on the workers.

`MLflowTrainCallback` logs the trial to MLflow live; `ReportQueueCallback` forwards each report to
the driver, which prints it (progress.py). Apart from tracking.py, so that what only reads or
writes MLflow, such as `ercstudy eval`, does not import Ray.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from .tracking import StepBuffer, client, log_result

# too large for a progress queue, and no line shows it
NOT_FORWARDED = ("coupling_matrix",)


class MLflowTrainCallback(UserCallback):
    """Logs every report of one trial to one MLflow run (made by the driver), as checkpoints cover them.

    notes: a queue that the driver prints from (progress.TrainProgress): a logging failure is said there too.
    """

    def __init__(self, uri: str, run_id: str, notes: Any = None, *, logged: int = -1):
        self.uri, self.run_id, self.notes = uri, run_id, notes
        # each step once: a restarted worker group's repeated steps replace the held ones; `logged`: the last
        # step the run already holds (a resumed `ercstudy train`)
        self.buffer = StepBuffer(logged)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            for held in self.buffer.add(metrics[0], checkpointed=checkpoint is not None):
                log_result(client(self.uri), self.run_id, held)
        except Exception as err:  # tracking must never stop training: say so and go on
            message = f"ercstudy: MLflow logging failed at step {metrics[0].get('step')}: {type(err).__name__}: {err}"
            print(message, flush=True)
            if self.notes is not None:
                self.notes.put({"message": message})


class ReportQueueCallback(UserCallback):
    """Puts rank 0's metrics of every report into `reports` (a ray.util.queue.Queue the driver reads)."""

    def __init__(self, reports: Any):
        self.reports = reports

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            self.reports.put({k: v for k, v in metrics[0].items() if k not in NOT_FORWARDED})
        except Exception as err:  # the terminal's progress must never stop training
            print(f"ercstudy: could not forward the report of step {metrics[0].get('step')}: {type(err).__name__}: {err}", flush=True)
