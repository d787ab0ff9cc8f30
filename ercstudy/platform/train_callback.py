"""The Ray Train callbacks of `ercstudy train`: they run in the Train controller, not on the workers.

`MLflowTrainCallback` logs the trial to MLflow live; `ReportQueueCallback` forwards each report to
the driver, which prints it (progress.py). Apart from tracking.py, so that what only reads or
writes MLflow, such as `ercstudy eval`, does not import Ray.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from .tracking import client, log_result

# too large for a progress queue, and no line shows it
NOT_FORWARDED = ("coupling_matrix",)


class MLflowTrainCallback(UserCallback):
    """Logs every report of one trial to one MLflow run (made by the driver), live.

    notes: a queue that the driver prints from (progress.TrainProgress): a logging failure is said there too.
    """

    def __init__(self, uri: str, run_id: str, notes: Any = None):
        self.uri, self.run_id, self.notes = uri, run_id, notes

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            log_result(client(self.uri), self.run_id, metrics[0])
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
