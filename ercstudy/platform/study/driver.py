"""Running a study: Ray Tune drives the search (search.py: Optuna, ASHA); every trial is a TorchTrainer;
MLflow tracks them all.

Layers, as in Ray's Train-inside-Tune pattern: `study_trial` (a Tune function trainable, one per
trial) starts `tune_trial` (trial.py: a TorchTrainer of DeepSpeed workers, its reports passed on
to Tune by the trial's own thread). The driver (this module) owns the Tune run and MLflow's parent run; its Tune
callbacks write every trial's child run and print progress. A study lives in STORAGE/NAME
(storage.py: a shared path or an s3:// / gs:// URI, Ray's `storage_path`): Tune's experiment state
(searcher included), each trial's Train run (`train-<trial id>`, the checkpoints), the spec and the
study state (`study.json`), the leaderboard.

What the terminal shows is ercstudy's: the trials' table every 30 s, a line per finished trial,
the leaderboard and where the results are. Ray's and DeepSpeed's output goes to Ray's log files
(`verbose` streams it here too), and the driver leaves Ray before the leaderboard, so that
nothing follows it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from ercstudy.platform.cluster import storage as locations
from ercstudy.platform.cluster.capacity import Capacity, cluster_capacity, cpu_need, head_pin
from ercstudy.platform.study import leaderboard as ranking
from ercstudy.platform.study import optuna_store, relay
from ercstudy.platform.study.optuna_store import OptunaStore, OptunaStoreError
from ercstudy.platform.study.plan import StudyPlan, plan_study
from ercstudy.platform.study.progress import ProgressCallback
from ercstudy.platform.study.search import build_scheduler, build_search, point_tags
from ercstudy.platform.study.spec import Study, apply_params, parse_study
from ercstudy.platform.study.tables import text_table
from ercstudy.platform.tracking import client as tracking
from ercstudy.platform.tracking import outbox
from ercstudy.platform.tracking.callbacks import MLflowStudyCallback
from ercstudy.trainables import reports
from ercstudy.trainables.config import load_yaml
from ercstudy.trainables.devices import GPU_MEMORY_GB

STATE_FILE = "study.json"
SPEC_FILE = "study.yaml"
SYNC_PERIOD_S = 10
# The trial's driver only waits on its TorchTrainer: no CPU. It lives on the head node, with Ray Train's controller
# (which Ray Train puts on the node of the actor that calls fit()): a worker node lost (a spot GPU node preempted, an
# autoscaled node gone) then takes only workers, which Ray Train restarts from the last checkpoint; on any other node
# it would take the trial's driver with it, and the trial would fail. The head pin is fractional (capacity.HEAD_SLOTS at once).
TRIAL_ACTOR = {"CPU": 0, "memory": 64 * 1024**2}  # and capacity.head_pin()


class StudyError(RuntimeError):
    """The study cannot run (resources, tracking, state); the message says what to do."""


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Tune trial actor)


def study_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one trial = one TorchTrainer run, its reports forwarded to Tune."""
    from ercstudy.platform.study.trial import tune_trial
    from ercstudy.trainables.config import TrialConfig

    cfg = TrialConfig.from_dict(apply_params(config["base"], config["params"]))
    trial_id = tune.get_context().get_trial_id()
    # named by the trial id (stable across `ercstudy resume`): Train resumes from the run's checkpoint
    result = tune_trial(cfg, name=locations.train_run_name(trial_id), storage_path=config["train_storage"])
    if result.error:
        raise RuntimeError(result.error)


# ---------------------------------------------------------------------------------------------
# Resources


def trial_resources(study: Study) -> tuple[int, int]:
    r = study.base_config.resources
    return r.num_workers * r.cpus_per_worker, r.num_workers * r.gpus_per_worker


def check_gpu_memory(plan: StudyPlan, cap: Capacity) -> None:
    """Refuse, before any trial starts, a study whose largest trial needs more memory per worker than every GPU type
    the cluster names holds (TrialConfig.memory_per_worker; devices.GPU_MEMORY_GB: the smallest each type comes in).
    A cluster that names no known type is not checked here: each worker checks its own GPU as it starts."""
    known = {t: GPU_MEMORY_GB[t] for t in cap.gpu_types if t in GPU_MEMORY_GB}
    if not known or len(known) < len(cap.gpu_types):
        return
    need = max(c.memory_per_worker(gpu=True) for c in plan.extreme_configs()) / 1e9
    most = max(known.values())
    if need > most:
        types = ", ".join(f"{t} ({gb} GB)" for t, gb in sorted(known.items()))
        raise StudyError(f"resources: a worker of this study's largest trial needs about {need:.0f} GB (model, optimizer "
                         f"state and activations, bf16), the cluster's GPUs hold at most {most} GB ({types}): raise "
                         f"resources.ep_size or num_workers, or lower train.micro_batch_size (ercstudy dry-run shows mem/worker)")


def concurrency(plan: StudyPlan, cap: Capacity) -> int:
    """Trials that can run at once; a study that can never run one is refused here, not left waiting."""
    study = plan.study
    cpus, gpus = trial_resources(study)
    need, spare, words = cpu_need(cpus, study.base_config.data)
    where = "an autoscaling cluster at its largest" if cap.autoscaling else "this Ray cluster"
    if gpus > cap.gpus:
        raise StudyError(f"resources: a trial needs {gpus:g} GPU(s) ({study.base_config.resources.num_workers} worker(s)), "
                         f"{where} has {cap.gpus:g}; lower resources.gpus_per_worker / num_workers, or run on a GPU cluster (--address)")
    if need > cap.cpus:
        raise StudyError(f"resources: a trial needs {words}, {where} has {cap.cpus:g}; lower resources.num_workers / cpus_per_worker")
    if gpus:
        check_gpu_memory(plan, cap)
    if cap.cpus == float("inf"):
        print("ercstudy: the cluster's autoscaler does not publish its largest size (Ray's v1 autoscaler): trial resources "
              "are not checked against it, and search.max_concurrent (else every trial) bounds the trials at once", file=sys.stderr)
        return max(1, min(study.search.max_concurrent or plan.num_trials, plan.num_trials))
    fit = int((cap.cpus - spare) // cpus)  # cpus > 0 (resources.cpus_per_worker may be a fraction)
    if gpus:
        fit = min(fit, int(cap.gpus // gpus))
    wanted = study.search.max_concurrent or fit
    return max(1, min(wanted, fit, plan.num_trials))


# ---------------------------------------------------------------------------------------------
# The study driver


@dataclass(frozen=True)
class StudyState:
    """What `ercstudy resume` and `ercstudy report` need, kept in STORAGE/NAME/study.json."""

    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    def write(self, path: locations.Location) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def read(cls, path: locations.Location) -> StudyState:
        return cls(**json.loads(path.read_text()))


def study_path(storage: str, name: str, *, multi_node: bool = False) -> locations.Location:
    """STORAGE/NAME (storage errors: locations.StorageError)."""
    return locations.resolve(storage, multi_node=multi_node) / name


def load_saved_study(storage: str, name: str) -> tuple[Study, StudyState]:
    """A study's spec and state, read back from its storage (any machine that sees it)."""
    try:
        d = study_path(storage, name)
        locations.check(d, write=False)
        found = (d / STATE_FILE).is_file()
    except (locations.StorageError, OSError) as err:
        raise StudyError(str(err) if isinstance(err, locations.StorageError) else locations.why(d, err)) from None
    if not found:
        where = storage if locations.is_uri(storage) else os.path.abspath(os.path.expanduser(storage))
        raise StudyError(f"no study {name!r} in {where} (looked for {d / STATE_FILE}); `ercstudy run SPEC` starts one, "
                         f"--storage (or ERCSTUDY_STORAGE) says where studies are")
    study = parse_study(load_yaml((d / SPEC_FILE).read_text()), source=str(d / SPEC_FILE))
    return study, StudyState.read(d / STATE_FILE)


def spec_text(study: Study) -> str:
    """The study's file as written; with command-line overrides, the file they make (a study made in code, with no
    file: only its name)."""
    if study.overrides and study.spec is not None:
        return (f"# {study.source or 'the study'} with the overrides {' '.join(study.overrides)}\n"
                + yaml.safe_dump(study.spec, sort_keys=False))
    if study.source and not locations.is_uri(study.source) and Path(study.source).is_file():
        return Path(study.source).read_text()
    return yaml.safe_dump({"name": study.name})


def open_tracking(study: Study, *, state: StudyState | None, directory: locations.Location) -> tuple[str, Any]:
    """The tracking URI and the study's tracker (outbox.py), after checking that the store answers (no run is made
    here); what a previous driver buffered in the study's outbox is written first."""
    uri = state.tracking_uri if state else tracking.resolve_uri(study.tracking.uri)
    tracking.check_reachable(uri)
    c = outbox.tracker(uri, directory / outbox.OUTBOX)
    c.drain()
    return uri, c


def create_parent_run(study: Study, uri: str, c: Any) -> StudyState:
    """The study's MLflow parent run: its search space as params, its file as an artifact."""
    exp_id = tracking.experiment_id(c, study.experiment)
    run = c.create_run(exp_id, run_name=study.name, tags={tracking.STUDY_TAG: study.name, tracking.STATUS_TAG: "running",
                                                          **tracking.provenance()})
    pid = run.info.run_id
    from mlflow.entities import Param

    flat = tracking.flat_params({"search": {p: str(v) for p, v in study.search.params.items()}})
    flat.update({"sampler": study.search.sampler, "num_trials": str(study.search.num_trials),
                 "objective": ", ".join(f"{o.metric} ({o.mode})" for o in study.objectives), "scheduler": study.scheduler.type})
    if study.overrides:
        flat["overrides"] = " ".join(study.overrides)
    c.log_batch(pid, params=[Param(k, v[:500]) for k, v in flat.items()], synchronous=True)
    c.log_text(pid, spec_text(study) if study.source or study.overrides else yaml.safe_dump(study.base), "study.yaml")
    return StudyState(study.name, uri, exp_id, pid)


def run_study(study: Study, *, storage: str, address: str | None = None, resume: bool = False,
              progress_every_s: float = 30.0, verbose: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) a study; returns the leaderboard (best first).

    verbose: Ray's and DeepSpeed's output streams to this terminal as well as to Ray's log files.
    """
    from ercstudy.platform.cluster.ray_runtime import prestart, ray_session

    plan = plan_study(study)
    # the storage first, before tracking and Ray: a bad one is one line, and no trial or parent run exists yet
    try:
        directory = study_path(storage, study.name, multi_node=address is not None)
        locations.check(directory.parent)
        state = StudyState.read(directory / STATE_FILE) if resume else None
        exists = not resume and directory.exists()
        if resume:
            OptunaStore(str(directory)).check()  # one in a database needs its URL again
        optuna_store.check_database()  # ERCSTUDY_OPTUNA_DB answers, before a parent run or a trial exists
    except (locations.StorageError, OptunaStoreError) as err:
        raise StudyError(str(err)) from None
    if exists:
        raise StudyError(f"study {study.name!r} already exists in {directory}: `ercstudy resume {study.name}` continues it, "
                         f"or rename the study (name:) for a new one")
    prestart(address)  # a private Ray starts while the tracking store opens
    uri, c = open_tracking(study, state=state, directory=directory)  # before any Ray resource: an unreachable server fails here
    with ray_session(address, verbose=verbose) as logs:
        cap = cluster_capacity()
        max_concurrent = concurrency(plan, cap)
        # the parent run only once nothing can refuse the study: a refused study leaves no RUNNING run behind
        state = state or create_parent_run(study, uri, c)
        if not resume:
            (directory / SPEC_FILE).write_text(spec_text(study))
            state.write(directory / STATE_FILE)
        print(f"study {study.name}: {plan.count_line()}, up to {max_concurrent} at once "
              f"({cap.cpus:g} CPUs, {cap.gpus:g} GPUs{', autoscaling' if cap.autoscaling else ''}); results: {directory}", flush=True)
        print(f"MLflow: {state.tracking_uri} | experiment {study.experiment!r} | parent run {state.parent_run_id}", flush=True)
        print(f"Ray's logs (workers, DeepSpeed): {logs.where()}" + ("" if verbose else "; --verbose shows them here too"), flush=True)
        results = fit(plan, directory, state, resume=resume, max_concurrent=max_concurrent, progress_every_s=progress_every_s,
                      verbose=verbose)
    # out of Ray now: no line that Ray streams can follow the leaderboard
    board = leaderboard(study, results)
    write_leaderboard(study, board, directory, c, state, logs=logs)
    c.close()  # what the outbox still holds, if the server went away near the end
    return board


def fit(plan: StudyPlan, directory: locations.Location, state: StudyState, *, resume: bool, max_concurrent: int,
        progress_every_s: float, verbose: bool = False) -> list[tuple[dict, dict, Any, str]]:
    """The Tune run (new, or restored from STORAGE/NAME); returns each trial's (metrics, config, error, path)."""
    study = plan.study
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # eval metrics come every eval.every steps only
    if not verbose:
        # Tune's default output engine prints its experiment box and "View detailed results here" even
        # at verbose=0 (TuneTerminalReporter.experiment_started in ray/tune/experimental/output.py);
        # its legacy engine, which this variable selects, prints nothing at 0.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(study_trial, {**TRIAL_ACTOR, **head_pin()})
    # the trials' reports reach their Tune actors through it (trial.tune_trial); it lives while this handle does
    train_storage = str(directory / "train")
    reports_relay = relay.start(train_storage, head_pin())
    callbacks = [MLflowStudyCallback(study.name, state.tracking_uri, state.experiment_id, state.parent_run_id,
                                     outbox=str(directory / outbox.OUTBOX), trial_config=plan.trial_config,
                                     point_tags=point_tags),
                 ProgressCallback(plan, every_s=progress_every_s), RelayCleanup()]
    run_config = tune.RunConfig(
        name=study.name, storage_path=str(directory.parent), callbacks=callbacks, verbose=0,
        failure_config=tune.FailureConfig(max_failures=0),  # Train retries workers itself (train.max_failures)
        # Tune uploads its experiment state (what `resume` restores) from a local staging copy at most this often
        # (default 300 s): a driver killed between uploads would lose minutes of trials' progress on remote storage
        sync_config=tune.SyncConfig(sync_period=SYNC_PERIOD_S),
    )
    if resume:
        # the callbacks come back from Tune's experiment state (they find their trials' MLflow runs by tag)
        tuner = tune.Tuner.restore(str(directory), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"base": study.base, "train_storage": train_storage},
            tune_config=tune.TuneConfig(
                search_alg=build_search(plan, str(directory)), scheduler=build_scheduler(plan), num_samples=plan.num_trials,
                max_concurrent_trials=max_concurrent, metric=study.objective.metric, mode=study.objective.mode,
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=run_config,
        )
    results = [(r.metrics or {}, r.config or {}, r.error, r.path) for r in tuner.fit()]
    del reports_relay
    return results


class RelayCleanup(tune.Callback):
    """Closes an ended trial's channel of the study's report relay: a trial that ASHA stopped, or that failed, never
    closed it itself (its actor was killed), and its channel may still hold a report. Stateless (Tune pickles its
    callbacks with the experiment state): it finds the relay by name."""

    def _close(self, trial: Any) -> None:
        relay.close(trial.config["train_storage"], locations.train_run_name(trial.trial_id))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial)


def leaderboard(study: Study, results: list[tuple]) -> list[dict[str, Any]]:
    """One row per trial (trial, status, step, params, objectives), best first (leaderboard.rank).

    results: (final metrics, Tune config, error or None[, trial path]) per trial.
    """
    rows = []
    for metrics, config, error, *path in results:
        status = tracking.trial_status(metrics, metrics.get(reports.TOTAL_STEPS), error=error is not None)
        row = {"trial": metrics.get(reports.TRIAL_ID) or (Path(path[0]).name if path else ""), "status": status,
               "step": metrics.get(reports.STEP), **config.get("params", {})}
        row.update(ranking.metric_columns(study, metrics))  # the objectives, then any harness/ metrics
        rows.append(row)
    return ranking.rank(study, rows)


def write_leaderboard(study: Study, board: list[dict[str, Any]], directory: locations.Location, c: Any, state: StudyState,
                      logs: Any = None) -> None:
    """The leaderboard to STORAGE/NAME/leaderboard.csv and the parent run (which it closes), then the summary."""
    cols = list(dict.fromkeys(k for r in board for k in r))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=cols)
    w.writeheader()
    w.writerows(board)
    (directory / "leaderboard.csv").write_text(text.getvalue())
    c.log_text(state.parent_run_id, text.getvalue(), "leaderboard.csv")
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

    print(f"\nleaderboard ({ranking.title(study)}):")
    print("\n".join(text_table(board, cols, left=("trial", "status"), indent="  ")))
    page = tracking.runs_page(state.experiment_id, study.objective.metric, study.objective.mode)
    runs = f"{page} (sorted by the objective; expand the study's run, select its trials, Compare)"
    ui = (f"the runs: {state.tracking_uri.rstrip('/')}/{runs}" if state.tracking_uri.startswith(("http://", "https://"))
          else f"open the UI with: mlflow ui --backend-store-uri {state.tracking_uri}\n  then http://127.0.0.1:5000/{runs}")
    print(f"\nresults: {directory}" + (f"\nRay's logs: {logs.where()}" if logs is not None else ""))
    print(f"MLflow: {state.tracking_uri} (experiment {study.experiment!r}); {ui}", flush=True)
