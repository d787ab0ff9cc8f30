"""The search: Optuna's sampler over the study's constrained define-by-run space, the Tune searcher
that tells Optuna how each trial really ended, and ASHA.

`sample_point` draws params in file order from the ranges `Study.space` leaves (the constraints
applied to the values drawn so far), so every sampled trial satisfies every constraint.
`StudySearch` is a Tune Searcher around one Optuna study (ask and tell): Ray's OptunaSearch tells
a trial that ASHA stopped early COMPLETE with its early value, which biases TPE toward short
runs, and reads the objective from every result, while eval metrics come at eval steps only.
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

from ray.tune.search import Searcher

from .study import Study, corner_points, is_empty

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The define-by-run space


def sample_point(study: Study, trial: Any) -> dict[str, Any]:
    """Draw one point with the Optuna `trial` (define-by-run), every constraint satisfied by construction.

    A param whose range a constraint narrows is asked under a name that carries the range
    (`moe.top_k|1..4`): Optuna refuses to change a categorical's choices under one name, and
    TPE models each such conditional range separately.
    """
    point: dict[str, Any] = {}
    for path, param in study.search.params.items():
        space = study.space(path, point)
        if is_empty(space):
            from ercstudy.trainables.validation import ConfigError

            raise ConfigError(f"search.params.{path}", f"no value satisfies the constraints given {point}")
        if isinstance(space, list):
            name = path if len(space) == len(param.choices) else f"{path}|{','.join(map(str, space))}"
            point[path] = trial.suggest_categorical(name, space)
            continue
        narrowed = (space.low, space.high) != (param.low, param.high)
        name = f"{path}|{space.low:g}..{space.high:g}" if narrowed else path
        if param.type == "int":
            point[path] = trial.suggest_int(name, int(space.low), int(space.high), step=param.step or 1, log=param.log)
        else:
            point[path] = trial.suggest_float(name, space.low, space.high, log=param.log)
    return point


@dataclass(frozen=True)
class DefineByRun:
    """The Optuna space of a study: a picklable callable (Tune saves the searcher with the experiment state)."""

    study: Study

    def __call__(self, trial: Any) -> dict[str, Any]:
        return {"params": sample_point(self.study, trial)}


def optuna_sampler(study: Study) -> Any:
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    s = study.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "grid":
        # BruteForceSampler walks a define-by-run space exhaustively (narrowed ranges included)
        return optuna.samplers.BruteForceSampler(seed=s.seed)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, group=True, constant_liar=True)


# ---------------------------------------------------------------------------------------------
# The searcher


class StudySearch(Searcher):
    """A Tune Searcher that asks one Optuna study for each trial's point and tells it how the trial ended.

    A result without the (primary) objective is not reported to Optuna (eval metrics come at
    eval steps only); a trial stopped before its last step is PRUNED (TPE ranks it by its
    intermediate values); a trial stopped by a non-finite loss, or failed, is FAIL; a trial that
    finished its budget is COMPLETE with its final objective value(s).
    """

    def __init__(self, space: DefineByRun, *, metric: str | list[str], mode: str | list[str], sampler: Any, study_name: str):
        import optuna

        super().__init__(metric=metric, mode=mode)
        modes = mode if isinstance(mode, list) else [mode]
        self.space = space
        self.study = optuna.create_study(
            sampler=sampler, pruner=optuna.pruners.NopPruner(), study_name=study_name,
            directions=["minimize" if m == "min" else "maximize" for m in modes],
        )
        self.trials: dict[str, Any] = {}  # Tune trial id -> Optuna trial
        self.told: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id not in self.trials:
            self.trials[trial_id] = self.study.ask()
        return self.space(self.trials[trial_id])

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Optuna keeps intermediate values for single-objective studies only
        if isinstance(self.metric, list) or self.metric not in result or trial_id not in self.trials or trial_id in self.told:
            return
        value = result[self.metric]
        if isinstance(value, (int, float)) and math.isfinite(value):
            self.trials[trial_id].report(value, int(result.get("step", result.get("training_iteration", 0))))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.told or trial_id not in self.trials:
            return
        from optuna.trial import TrialState

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
            self.study.tell(self.trials[trial_id], values if values is None or len(values) > 1 else values[0], state=state)
        except RuntimeError as err:  # the grid sampler stops the study after its last point: nothing to do
            logger.info("optuna: %s", err)
        self.told.add(trial_id)

    # Tune saves the searcher with its experiment state (`ercstudy resume` restores it)
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def build_search(study: Study) -> StudySearch:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    metrics = [o.metric for o in study.objectives]
    modes = [o.mode for o in study.objectives]
    return StudySearch(
        DefineByRun(study),
        metric=metrics if study.multi_objective else metrics[0],
        mode=modes if study.multi_objective else modes[0],
        sampler=optuna_sampler(study),
        study_name=study.name,
    )


# ---------------------------------------------------------------------------------------------
# Early stopping


def budget(study: Study) -> int:
    """The longest trial of the space in scheduler.time_attr units (steps or tokens): ASHA's max_t."""
    longest = 0
    for point in corner_points(study):
        cfg = study.trial_config(point)
        tokens = cfg.steps * cfg.train.global_batch_size * cfg.model.seq_len
        longest = max(longest, cfg.steps if study.scheduler.time_attr == "step" else tokens)
    return longest


def build_scheduler(study: Study) -> Any:
    """ASHA on the primary objective (metric and mode come from TuneConfig), or None."""
    from ray.tune.schedulers import ASHAScheduler

    s = study.scheduler
    if s.type == "none":
        return None
    return ASHAScheduler(time_attr=s.time_attr, max_t=budget(study), grace_period=s.grace_period, reduction_factor=s.reduction_factor)
