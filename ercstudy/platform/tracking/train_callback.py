"""The Ray Train callbacks of `ercstudy train`: they run in the Train controller, not on the workers.

`MLflowTrainCallback` logs the trial to MLflow live (beside trial.ReportQueueCallback, which forwards
each report to the driver, which prints it: progress.py). Apart from tracking.py, so that what only
reads or writes MLflow, such as `ercstudy eval`, does not import Ray.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from ercstudy.platform.tracking.client import StepBuffer, client, log_result


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

