"""The Ray Train callback that logs `ercstudy train`'s trial to MLflow (apart from tracking.py,
so that what only reads or writes MLflow, such as `ercstudy eval`, does not import Ray)."""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from .tracking import client, log_result


class MLflowTrainCallback(UserCallback):
    """Ray Train callback for `ercstudy train`: logs every report of one trial to one MLflow run, live.

    It runs in the Train controller (not on the workers), with the run made by the driver.
    """

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            log_result(client(self.uri), self.run_id, metrics[0])
        except Exception as err:  # tracking must never stop training: say so and go on
            print(f"ercstudy: MLflow logging failed at step {metrics[0].get('step')}: {type(err).__name__}: {err}", flush=True)
