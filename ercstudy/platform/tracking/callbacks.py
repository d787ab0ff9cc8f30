"""The study driver's Tune callbacks: every trial's MLflow child run, and the progress the terminal shows.

Both run in the driver, Tune's event loop: MLflow has one writer per study (a SQLite store takes
that), and the terminal gets ercstudy's lines only. Tune pickles them with its experiment state,
so that `ercstudy resume` gets them back.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from ray import tune

from ercstudy.platform.study.search import point_tags
from ercstudy.platform.study.spec import Study, num_trials
from ercstudy.platform.study.tables import cell
from ercstudy.platform.tracking import client as tracking
from ercstudy.platform.tracking import outbox
from ercstudy.trainables.config import RESTORED_KEY


class MLflowStudyCallback(tune.Callback):
    """One nested MLflow child run per trial, written from the driver (one writer for a SQLite store).

    outbox: where the writes wait while the server does not answer (outbox.py; the runner shares it)."""

    def __init__(self, study: Study, uri: str, experiment_id: str, parent_run_id: str, outbox: str | None = None):
        self.study, self.uri, self.experiment_id, self.parent_run_id = study, uri, experiment_id, parent_run_id
        self.outbox = outbox
        self.runs: dict[str, str] = {}
        # per trial: reports held until a checkpoint covers them (each step once in MLflow, see tracking.StepBuffer);
        # a resumed study starts each buffer at the last step its run already holds
        self.buffers: dict[str, tracking.StepBuffer] = {}
        self._client = None
        self._reconciled = False

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_client": None, "runs": {}, "buffers": {}, "_reconciled": False}

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
        # found by its tags in a resumed study (its buffer then starts at the last step the run holds), else made;
        # while the server does not answer, a pending run made when the outbox is written back
        run_id, logged = self.client.trial_run(
            experiment_id=self.experiment_id, parent_run_id=self.parent_run_id, trial_id=trial.trial_id,
            name=f"{self.study.name}-{trial.trial_id}", config=self.study.trial_config(params).to_dict(), params=params,
            tags={tracking.TRIAL_TAG: trial.trial_id, tracking.STUDY_TAG: self.study.name, **point_tags(trial.config)},
        )
        self.buffers.setdefault(trial.trial_id, tracking.StepBuffer(logged))
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

    def _buffer(self, trial: Any) -> tuple[tracking.StepBuffer, str]:
        run_id = self.run_id(trial)  # first: a resumed trial's buffer starts from its run's history
        return self.buffers.setdefault(trial.trial_id, tracking.StepBuffer()), run_id

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        buffer, run_id = self._buffer(trial)
        if result.get(RESTORED_KEY) and result.get("resumed_from_step") is not None:
            for report in buffer.restored(result[RESTORED_KEY], int(result["resumed_from_step"])):
                self.client.log_result(run_id, report)
        for held in buffer.add(result, checkpointed=bool(result.get("checkpoint_path"))):
            self.client.log_result(run_id, held)

    def _flush(self, trial: Any) -> None:
        buffer, run_id = self._buffer(trial)
        for held in buffer.flush():  # the trial is over: nothing will report these steps again
            self.client.log_result(run_id, held)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._flush(trial)
        final = trial.last_result or {}
        status = tracking.trial_status(final, final.get("total_steps"))
        note = final.get("stop_reason") or ("stopped by ASHA at step {}".format(final.get("step")) if status == "stopped_early" else "")
        if status == "stopped_early" and self.study.trial_config(trial.config["params"]).eval.harness.enabled:
            # the workers were stopped with the trial: no evaluation at its last checkpoint (README: a study's lm-eval tasks)
            self.client.set_tag(self.run_id(trial), tracking.HARNESS_TAG, f"not evaluated at the end: stopped by ASHA at step "
                                f"{final.get('step')} (harness/ metrics exist for the eval.harness.at steps before it, if any)")
        self.client.finish_trial_run(self.run_id(trial), status, final, note=note)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._flush(trial)
        error = ""
        if trial.error_file and os.path.exists(trial.error_file):
            error = Path(trial.error_file).read_text(errors="replace").strip().splitlines()[-1]
        self.client.finish_trial_run(self.run_id(trial), "failed", trial.last_result or {}, note=error)


class ProgressCallback(tune.Callback):
    """A compact table of the trials every `every_s` seconds, and a line per finished trial."""

    def __init__(self, study: Study, every_s: float = 30.0):
        self.study, self.every_s = study, every_s
        self.last = 0.0
        self.started = time.monotonic()

    @property
    def out(self) -> Any:
        return sys.stdout

    def _row(self, trial: Any, status: str | None = None) -> str:
        r = trial.last_result or {}
        status = status or trial.status
        params = " ".join(f"{p.split('.')[-1]}={cell(v)}" for p, v in trial.config.get("params", {}).items())
        objs = " ".join(f"{o.metric}={cell(r[o.metric])}" for o in self.study.objectives if o.metric in r)
        step = f"step {r['step']}/{r.get('total_steps', '?')}" if "step" in r else "starting"
        return f"  {trial.trial_id:<14} {status:<13} {step:<14} {params} | {objs}"

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s or not trials:
            return
        self.last = now
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        print(f"[{self.study.name}] {now - self.started:,.0f} s | {done}/{num_trials(self.study)} trials done, "
              f"{sum(t.status == 'RUNNING' for t in trials)} running", file=self.out, flush=True)
        for t in trials:
            print(self._row(t), file=self.out, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune marks the trial TERMINATED only after its callbacks: say how it ended instead
        final = trial.last_result or {}
        status = tracking.trial_status(final, final.get("total_steps"))
        print(f"[{self.study.name}] finished{self._row(trial, status)[1:]}", file=self.out, flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[{self.study.name}] FAILED  {self._row(trial)[2:]} (error: {trial.error_file})", file=self.out, flush=True)
