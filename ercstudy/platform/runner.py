"""Running a study: Ray Tune drives Optuna and ASHA; every trial is a TorchTrainer; MLflow tracks them all.

Layers, as in Ray's Train-inside-Tune pattern: `study_trial` (a Tune function trainable, one per
trial) starts `run_trial` (a TorchTrainer of DeepSpeed workers) with a TuneReportCallback. The
driver (this module) owns the Optuna search, the scheduler, and MLflow's parent run; its Tune
callbacks write every trial's child run and print progress. A study lives in STORAGE/NAME:
Tune's experiment state (searcher included), each trial's Train run (`train-<trial id>`, the
checkpoints), the spec and the study state (`study.json`), the leaderboard.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from . import tracking
from .study import Study, apply_params, num_trials, optuna_sampler, parse_study, sample_point

logger = logging.getLogger(__name__)
STATE_FILE = "study.json"
SPEC_FILE = "study.yaml"
TRIAL_ACTOR = {"CPU": 0, "memory": 64 * 1024**2}  # the trial's driver only waits on its TorchTrainer: no CPU


class StudyError(RuntimeError):
    """The study cannot run (resources, tracking, state); the message says what to do."""


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Tune trial actor)


def study_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one trial = one TorchTrainer run, its reports forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ercstudy.trainables.config import TrialConfig
    from ercstudy.platform.trial import run_trial

    cfg = TrialConfig.from_dict(apply_params(config["base"], config["params"]))
    trial_id = tune.get_context().get_trial_id()
    # named by the trial id (stable across `ercstudy resume`): Train resumes from the run's checkpoint
    result = run_trial(cfg, name=f"train-{trial_id}", storage_path=config["train_storage"], callbacks=[TuneReportCallback()])
    if result.error:
        raise RuntimeError(result.error)


# ---------------------------------------------------------------------------------------------
# Optuna


class StudySearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about trials that did not finish their budget.

    Ray's OptunaSearch tells a trial stopped early by ASHA as COMPLETE with its early value,
    which biases TPE toward short runs; and it reads the objective from every result, while
    eval metrics appear only at eval steps. Here a result without the metric is skipped, a
    trial stopped before its last step is PRUNED (TPE ranks it by its intermediate values),
    and a trial stopped by a non-finite loss is FAIL.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or self.metric not in result or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        value = result[self.metric]
        if isinstance(value, (int, float)) and math.isfinite(value):
            ot_trial.report(value, int(result.get("step", result.get("training_iteration", 0))))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        from optuna.trial import TrialState

        ot_trial = self._ot_trials[trial_id]
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(m) for m in metrics] if result else [None]
        finished = bool(result) and int(result.get("step", 0)) >= int(result.get("total_steps", 0))
        if error or (result or {}).get("stop_reason"):
            state, values = TrialState.FAIL, None
        elif not finished or any(v is None or not math.isfinite(v) for v in values):
            state, values = TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
        try:
            self._ot_study.tell(ot_trial, values if values is None or len(values) > 1 else values[0], state=state)
        except RuntimeError as err:  # the grid sampler stops the study after its last point: nothing to do
            logger.info("optuna: %s", err)
        self._completed_trials.add(trial_id)


@dataclass(frozen=True)
class DefineByRun:
    """The Optuna space: a picklable callable (Tune saves the searcher with the experiment state)."""

    study: Study

    def __call__(self, trial: Any) -> dict[str, Any]:
        return {"params": sample_point(self.study, trial)}


def build_search(study: Study) -> StudySearch:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    metrics = [o.metric for o in study.objectives]
    modes = [o.mode for o in study.objectives]
    return StudySearch(
        space=DefineByRun(study),
        metric=metrics if study.multi_objective else metrics[0],
        mode=modes if study.multi_objective else modes[0],
        sampler=optuna_sampler(study),
        study_name=study.name,
    )


def build_scheduler(study: Study) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    s = study.scheduler
    if s.type == "none":
        return None
    budget = max((study.trial_config(p).steps if s.time_attr == "step" else
                  study.trial_config(p).steps * study.trial_config(p).train.global_batch_size * study.trial_config(p).model.seq_len)
                 for p in _corners(study))
    # metric and mode come from TuneConfig (the primary objective)
    return ASHAScheduler(time_attr=s.time_attr, max_t=budget, grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def _corners(study: Study) -> list[dict[str, Any]]:
    from .study import corner_points

    return corner_points(study)


# ---------------------------------------------------------------------------------------------
# Resources


@dataclass(frozen=True)
class Capacity:
    cpus: float
    gpus: float
    autoscaling: bool


def cluster_capacity() -> Capacity:
    """What the connected cluster has now, or could have once its autoscaler adds nodes."""
    import ray

    now = ray.cluster_resources()
    cpus, gpus = now.get("CPU", 0.0), now.get("GPU", 0.0)
    try:
        from ray._private.state import state  # what Ray Data's autoscaler asks too (private API)

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:
        most = {}
    return Capacity(max(cpus, most.get("CPU", 0)), max(gpus, most.get("GPU", 0)), bool(most))


def trial_resources(study: Study) -> tuple[int, int]:
    r = study.base_config.resources
    return r.num_workers * r.cpus_per_worker, r.num_workers * r.gpus_per_worker


def concurrency(study: Study, cap: Capacity) -> int:
    """Trials that can run at once; a study that can never run one is refused here, not left waiting."""
    cpus, gpus = trial_resources(study)
    where = "an autoscaling cluster at its largest" if cap.autoscaling else "this Ray cluster"
    if gpus > cap.gpus:
        raise StudyError(f"resources: a trial needs {gpus:g} GPU(s) ({study.base_config.resources.num_workers} worker(s)), "
                         f"{where} has {cap.gpus:g}; lower resources.gpus_per_worker / num_workers, or run on a GPU cluster (--address)")
    if cpus > cap.cpus:
        raise StudyError(f"resources: a trial needs {cpus:g} CPU(s), {where} has {cap.cpus:g}; lower resources.num_workers / cpus_per_worker")
    fit = int(cap.cpus // max(cpus, 1))
    if gpus:
        fit = min(fit, int(cap.gpus // gpus))
    wanted = study.search.max_concurrent or fit
    return max(1, min(wanted, fit, num_trials(study)))


# ---------------------------------------------------------------------------------------------
# Driver-side callbacks


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class MLflowStudyCallback(tune.Callback):
    """One nested MLflow child run per trial, written from the driver (one writer for a SQLite store)."""

    def __init__(self, study: Study, uri: str, experiment_id: str, parent_run_id: str):
        self.study, self.uri, self.experiment_id, self.parent_run_id = study, uri, experiment_id, parent_run_id
        self.runs: dict[str, str] = {}
        self.logged_step: dict[str, int] = {}  # resumed trials: steps already in MLflow are not logged twice
        self._client = None
        self._reconciled = False

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_client": None, "runs": {}, "logged_step": {}, "_reconciled": False}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = tracking.client(self.uri)
        return self._client

    def run_id(self, trial: Any) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{tracking.TRIAL_TAG}` = '{trial.trial_id}' and tags.`{tracking.PARENT_TAG}` = '{self.parent_run_id}'",
            max_results=1,
        )
        if found:  # a resumed study: the trial's run exists already
            run_id = found[0].info.run_id
            history = self.client.get_metric_history(run_id, "lm_loss")
            self.logged_step[trial.trial_id] = max((m.step for m in history), default=-1)
        else:
            params = trial.config["params"]
            cfg = self.study.trial_config(params)
            run_id = tracking.start_trial_run(
                self.client, self.experiment_id, name=f"{self.study.name}-{trial.trial_id}", config=cfg.to_dict(), params=params,
                parent_run_id=self.parent_run_id, tags={tracking.TRIAL_TAG: trial.trial_id, tracking.STUDY_TAG: self.study.name},
            )
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run_id(trial)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """On resume: finish the MLflow runs of trials that ended while the previous driver was dying."""
        if self._reconciled:
            return
        self._reconciled = True
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR") and self.client.get_run(self.run_id(trial)).info.status == "RUNNING":
                (self.on_trial_error if trial.status == "ERROR" else self.on_trial_complete)(iteration, trials, trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self.run_id(trial)
        if int(result.get("step", 0)) > self.logged_step.get(trial.trial_id, -1):
            tracking.log_result(self.client, run_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        final = trial.last_result or {}
        status = tracking.trial_status(final, final.get("total_steps"))
        note = final.get("stop_reason") or ("stopped by ASHA at step {}".format(final.get("step")) if status == "stopped_early" else "")
        tracking.finish_trial_run(self.client, self.run_id(trial), status, final, note=note)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = ""
        if trial.error_file and os.path.exists(trial.error_file):
            error = Path(trial.error_file).read_text(errors="replace").strip().splitlines()[-1]
        tracking.finish_trial_run(self.client, self.run_id(trial), "failed", trial.last_result or {}, note=error)


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
        params = " ".join(f"{p.split('.')[-1]}={_fmt(v)}" for p, v in trial.config.get("params", {}).items())
        objs = " ".join(f"{o.metric}={_fmt(r[o.metric])}" for o in self.study.objectives if o.metric in r)
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


# ---------------------------------------------------------------------------------------------
# The study driver


@dataclass(frozen=True)
class StudyState:
    """What `ercstudy resume` and `ercstudy report` need, kept in STORAGE/NAME/study.json."""

    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def read(cls, path: Path) -> StudyState:
        return cls(**json.loads(path.read_text()))


def study_path(storage: str, name: str) -> Path:
    return Path(storage).expanduser().absolute() / name


def load_saved_study(storage: str, name: str) -> tuple[Study, StudyState]:
    d = study_path(storage, name)
    if not (d / STATE_FILE).is_file():
        raise StudyError(f"no study {name!r} in {d.parent} (looked for {d / STATE_FILE}); `ercstudy run SPEC` starts one")
    study = parse_study(yaml.safe_load((d / SPEC_FILE).read_text()), source=str(d / SPEC_FILE))
    return study, StudyState.read(d / STATE_FILE)


def open_tracking(study: Study, *, state: StudyState | None) -> tuple[StudyState, Any]:
    """Check the tracking store and create (or find, on resume) the study's parent run."""
    uri = state.tracking_uri if state else tracking.resolve_uri(study.tracking.uri)
    tracking.check_reachable(uri)
    c = tracking.client(uri)
    if state:
        return state, c
    exp_id = tracking.experiment_id(c, study.experiment)
    run = c.create_run(exp_id, run_name=study.name, tags={tracking.STUDY_TAG: study.name, tracking.STATUS_TAG: "running"})
    pid = run.info.run_id
    from mlflow.entities import Param

    flat = tracking.flat_params({"search": {p: str(v) for p, v in study.search.params.items()}})
    flat.update({"sampler": study.search.sampler, "num_trials": str(study.search.num_trials),
                 "objective": ", ".join(f"{o.metric} ({o.mode})" for o in study.objectives), "scheduler": study.scheduler.type})
    c.log_batch(pid, params=[Param(k, v[:500]) for k, v in flat.items()], synchronous=True)
    c.log_text(pid, Path(study.source).read_text() if study.source and Path(study.source).is_file() else yaml.safe_dump(study.base), "study.yaml")
    return StudyState(study.name, uri, exp_id, pid), c


def run_study(study: Study, *, storage: str, address: str | None = None, resume: bool = False,
              progress_every_s: float = 30.0) -> list[dict[str, Any]]:
    """Run (or resume) a study; returns the leaderboard (best first)."""
    from ercstudy.platform.ray_runtime import ensure_ray

    directory = study_path(storage, study.name)
    state = None
    if resume:
        state = StudyState.read(directory / STATE_FILE)
    elif directory.exists():
        raise StudyError(f"study {study.name!r} already exists in {directory}: `ercstudy resume {study.name}` continues it, "
                         f"or rename the study (name:) for a new one")
    state, c = open_tracking(study, state=state)  # before any Ray resource: an unreachable server fails here
    ensure_ray(address)
    cap = cluster_capacity()
    max_concurrent = concurrency(study, cap)
    directory.mkdir(parents=True, exist_ok=True)
    if not resume:
        (directory / SPEC_FILE).write_text(Path(study.source).read_text() if study.source and Path(study.source).is_file()
                                           else yaml.safe_dump({"name": study.name}))
        state.write(directory / STATE_FILE)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # eval metrics come every eval.every steps only
    print(f"study {study.name}: {num_trials(study)} trials, up to {max_concurrent} at once "
          f"({cap.cpus:g} CPUs, {cap.gpus:g} GPUs{', autoscaling' if cap.autoscaling else ''}); results: {directory}", flush=True)
    print(f"MLflow: {state.tracking_uri} | experiment {study.experiment!r} | parent run {state.parent_run_id}", flush=True)

    trainable = tune.with_resources(study_trial, TRIAL_ACTOR)
    callbacks = [MLflowStudyCallback(study, state.tracking_uri, state.experiment_id, state.parent_run_id),
                 ProgressCallback(study, every_s=progress_every_s)]
    run_config = tune.RunConfig(
        name=study.name, storage_path=str(directory.parent), callbacks=callbacks, verbose=0,
        failure_config=tune.FailureConfig(max_failures=0),  # Train retries workers itself (train.max_failures)
    )
    if resume:
        # the callbacks come back from Tune's experiment state (they find their trials' MLflow runs by tag)
        tuner = tune.Tuner.restore(str(directory), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"base": study.base, "train_storage": str(directory / "train")},
            tune_config=tune.TuneConfig(
                search_alg=build_search(study), scheduler=build_scheduler(study), num_samples=num_trials(study),
                max_concurrent_trials=max_concurrent, metric=study.objective.metric, mode=study.objective.mode,
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=run_config,
        )
    results = tuner.fit()
    board = leaderboard(study, [(r.metrics or {}, r.config or {}, r.error) for r in results],
                        [r.path for r in results])
    write_leaderboard(study, board, directory, c, state)
    return board


def leaderboard(study: Study, results: list[tuple[dict, dict, Any]], paths: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for i, (metrics, config, error) in enumerate(results):
        status = tracking.trial_status(metrics, metrics.get("total_steps"), error=error is not None)
        row = {"trial": metrics.get("trial_id") or Path((paths or [""] * len(results))[i]).name, "status": status,
               "step": metrics.get("step"), **{p: v for p, v in config.get("params", {}).items()}}
        row.update({o.metric: metrics.get(o.metric) for o in study.objectives})
        rows.append(row)
    o = study.objective
    sign = 1 if o.mode == "min" else -1
    ok = lambda r: r["status"] == "completed" and isinstance(r.get(o.metric), (int, float))  # noqa: E731
    if not study.multi_objective:
        return sorted(rows, key=lambda r: (not ok(r), sign * r[o.metric] if ok(r) else 0.0))
    front = pareto_front(study, rows)
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    return sorted(rows, key=lambda r: (not ok(r), not r["pareto"], sign * r[o.metric] if ok(r) else 0.0))


def pareto_front(study: Study, rows: list[dict[str, Any]]) -> set[int]:
    """Indices of the completed rows that no other completed row dominates on every objective."""
    def point(r: dict[str, Any]) -> tuple[float, ...] | None:
        values = [r.get(o.metric) for o in study.objectives]
        if r["status"] != "completed" or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return None
        return tuple(v if o.mode == "min" else -v for v, o in zip(values, study.objectives))  # all minimized

    points = {i: p for i, r in enumerate(rows) if (p := point(r)) is not None}
    dominated = lambda a, b: all(x <= y for x, y in zip(b, a)) and b != a  # noqa: E731 (b dominates a)
    return {i for i, a in points.items() if not any(dominated(a, b) for j, b in points.items() if j != i)}


def write_leaderboard(study: Study, board: list[dict[str, Any]], directory: Path, c: Any, state: StudyState) -> None:
    cols = list(dict.fromkeys(k for r in board for k in r))
    path = directory / "leaderboard.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(board)
    if study.multi_objective:
        objs = ", ".join(f"{o.metric} {o.mode}" for o in study.objectives)
        print(f"\nleaderboard (Pareto front of {objs} first, then by {study.objective.metric}):")
    else:
        print(f"\nleaderboard ({study.objective.metric}, {study.objective.mode}; best first):")
    print("  " + "  ".join(f"{k:>12}" for k in cols))
    for r in board:
        print("  " + "  ".join(f"{_fmt(r.get(k, '')):>12}" for k in cols))
    c.log_artifact(state.parent_run_id, str(path))
    best = next((r for r in board if r["status"] == "completed"), None)
    if best:
        for o in study.objectives:
            if isinstance(best.get(o.metric), (int, float)):
                c.log_metric(state.parent_run_id, f"best/{o.metric}", float(best[o.metric]))
        c.set_tag(state.parent_run_id, "ercstudy.best_trial", str(best["trial"]))
    if study.multi_objective:
        c.set_tag(state.parent_run_id, "ercstudy.pareto_trials", " ".join(str(r["trial"]) for r in board if r.get("pareto")))
    c.set_tag(state.parent_run_id, tracking.STATUS_TAG, "completed")
    c.set_terminated(state.parent_run_id, "FINISHED")
    runs = f"#/experiments/{state.experiment_id}/runs (expand the study's run, select its trials, Compare)"
    ui = (f"the runs: {state.tracking_uri.rstrip('/')}/{runs}" if state.tracking_uri.startswith(("http://", "https://"))
          else f"open the UI with: mlflow ui --backend-store-uri {state.tracking_uri}\n  then http://127.0.0.1:5000/{runs}")
    print(f"\nresults: {directory}\nMLflow: {state.tracking_uri} (experiment {study.experiment!r}); {ui}")
