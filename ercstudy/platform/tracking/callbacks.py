"""The MLflow callbacks: a study's (Tune, in the driver) and `ercstudy train`'s (Ray Train, in its controller).

`MLflowStudyCallback` runs in the study driver, Tune's event loop: MLflow has one writer per study (a
SQLite store takes that). Tune pickles it with its experiment state, so that `ercstudy resume` gets it
back. `MLflowTrainCallback` runs in the Train controller, not on the workers, and logs one trial live
(beside trial.ReportQueueCallback, which forwards each report to the driver, which prints it: progress.py).
Both log each report as it arrives, each step once (logged_steps.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.train import UserCallback

from ercstudy.platform.tracking import client as tracking
from ercstudy.platform.tracking import outbox
from ercstudy.platform.tracking.logged_steps import LoggedSteps
from ercstudy.trainables import reports


class MLflowStudyCallback(tune.Callback):
    """One nested MLflow child run per trial, written from the driver (one writer for a SQLite store).

    outbox: where the writes wait while the server does not answer (outbox.py; the runner shares it)."""

    def __init__(self, study_name: str, uri: str, experiment_id: str, parent_run_id: str, *, outbox: str | None = None,
                 trial_config: Callable[[dict[str, Any]], Any], point_tags: Callable[[dict[str, Any]], dict[str, str]]):
        self.study_name, self.uri, self.experiment_id, self.parent_run_id = study_name, uri, experiment_id, parent_run_id
        self.outbox = outbox
        self.trial_config = trial_config  # a trial's params -> its TrialConfig (the study's plan builds each once)
        self.point_tags = point_tags  # a trial's Tune config -> the MLflow tags of its point
        self.runs: dict[str, str] = {}
        # per trial: the steps its run holds (each step once in MLflow, see LoggedSteps); a resumed study starts
        # each at the last step its run already holds
        self.steps: dict[str, LoggedSteps] = {}
        self._client = None
        self._reconciled = False

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_client": None, "runs": {}, "steps": {}, "_reconciled": False}

    @property
    def client(self) -> Any:
        if self._client is None:
            # an older study's pickled callback has no outbox: a tracker that does not buffer
            self._client = outbox.tracker(self.uri, getattr(self, "outbox", None))
        return self._client

    def run_id(self, trial: Any) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        params = trial.config["params"]
        # found by its tags in a resumed study (its steps then start at the last one the run holds), else made;
        # while the server does not answer, a pending run made when the outbox is written back
        run_id, logged = self.client.trial_run(
            experiment_id=self.experiment_id, parent_run_id=self.parent_run_id, trial_id=trial.trial_id,
            name=f"{self.study_name}-{trial.trial_id}", config=self.trial_config(params).to_dict(), params=params,
            tags={tracking.TRIAL_TAG: trial.trial_id, tracking.STUDY_TAG: self.study_name, **self.point_tags(trial.config)},
        )
        self.steps.setdefault(trial.trial_id, LoggedSteps(logged))
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run_id(trial)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """While the server does not answer: try again when due. On resume: finish the MLflow runs of trials that
        ended while the previous driver was dying (once the server answers)."""
        self.client.tick()
        if self._reconciled or self.client.buffering:
            return
        try:
            ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")
                     and self.client.get_run(self.client.resolve(self.run_id(t))).info.status == "RUNNING"]
        except Exception as err:
            if self.client.is_outage(err):
                return  # at a later step
            raise
        self._reconciled = True
        for trial in ended:
            (self.on_trial_error if trial.status == "ERROR" else self.on_trial_complete)(iteration, trials, trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self.run_id(trial)  # first: a resumed trial's steps start from its run's history
        steps = self.steps.setdefault(trial.trial_id, LoggedSteps())
        if result.get(reports.RESTORED_HISTORY) and result.get(reports.RESUMED_FROM_STEP) is not None:
            for report in steps.restored(result[reports.RESTORED_HISTORY], int(result[reports.RESUMED_FROM_STEP])):
                self.client.log_result(run_id, report)
        for report in steps.new(result):
            self.client.log_result(run_id, report)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        final = trial.last_result or {}
        status = tracking.trial_status(final, final.get(reports.TOTAL_STEPS))
        note = final.get(reports.STOP_REASON) or (f"stopped by ASHA at step {final.get(reports.STEP)}" if status == "stopped_early" else "")
        if status == "stopped_early" and self.trial_config(trial.config["params"]).eval.harness.enabled:
            # the workers were stopped with the trial: no evaluation at its last checkpoint (README: a study's lm-eval tasks)
            self.client.set_tag(self.run_id(trial), tracking.HARNESS_TAG, f"not evaluated at the end: stopped by ASHA at step "
                                f"{final.get(reports.STEP)} (harness/ metrics exist for the eval.harness.at steps before it, if any)")
        self.client.finish_trial_run(self.run_id(trial), status, final, note=note)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = ""
        if trial.error_file and os.path.exists(trial.error_file):
            error = Path(trial.error_file).read_text(errors="replace").strip().splitlines()[-1]
        self.client.finish_trial_run(self.run_id(trial), "failed", trial.last_result or {}, note=error)


class MLflowTrainCallback(UserCallback):
    """Logs every report of one trial to one MLflow run (made by the driver), as it arrives, each step once.

    notes: a queue that the driver prints from (progress.TrainProgress): a logging failure is said there too.
    """

    def __init__(self, uri: str, run_id: str, notes: Any = None, *, logged: int = -1):
        self.uri, self.run_id, self.notes = uri, run_id, notes
        # each step once: a restarted worker group's repeated steps are not logged again; `logged`: the last
        # step the run already holds (a resumed `ercstudy train`)
        self.steps = LoggedSteps(logged)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if reports.checkpoint_only(metrics[0]):  # the step's own report follows
            return
        try:
            for report in self.steps.new(metrics[0]):
                tracking.log_result(tracking.client(self.uri), self.run_id, report)
        except Exception as err:  # tracking must never stop training: say so and go on
            message = f"ercstudy: MLflow logging failed at step {metrics[0].get(reports.STEP)}: {type(err).__name__}: {err}"
            print(message, flush=True)
            if self.notes is not None:
                self.notes.put({"message": message})

