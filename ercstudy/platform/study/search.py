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

from ercstudy.platform.cluster.private_apis import optuna_trial_id
from ercstudy.platform.study.optuna_store import OptunaStore
from ercstudy.platform.study.plan import StudyPlan
from ercstudy.platform.study.spec import Study, is_empty, point_label
from ercstudy.trainables import reports

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
    """A Tune Searcher that asks one Optuna study for each point and tells it how the point's trials ended.

    A result without the (primary) objective is not reported to Optuna (eval metrics come at
    eval steps only); a trial stopped before its last step is PRUNED (TPE ranks it by its
    intermediate values); a trial stopped by a non-finite loss, or failed, is FAIL; a trial that
    finished its budget is COMPLETE with its final objective value(s).

    Repeats and arms (study.search.repeats, .arms): each Optuna point becomes `repeats` Tune trials,
    one per seed (`train.seed` in its params), told to Optuna once all of them ended: COMPLETE with the
    mean of the objective(s) when every seed completed, else FAIL if one failed, else PRUNED; no
    intermediate values (several seeds would report one step). The fixed arms' trials come first, at the
    same seeds, and are never told. Each such trial's config carries `point`: {id, arm, repeat}, the
    MLflow tags that group a point's trials (`point_tags`).

    With a store (optuna_store.py) the Optuna study lives in the study's optuna.db, for optuna-dashboard and
    the report's importances; each told point carries the mean final `alpha_star` and `eps_mean` of its
    seeds as user attrs (RECORDED).
    """

    def __init__(self, plan: StudyPlan, *, metric: str | list[str], mode: str | list[str], sampler: Any,
                 store: OptunaStore | None = None):
        import optuna

        super().__init__(metric=metric, mode=mode)
        modes = mode if isinstance(mode, list) else [mode]
        directions = ["minimize" if m == "min" else "maximize" for m in modes]
        self.space = DefineByRun(plan.study)
        self.store = store  # the study's optuna.db (optuna_store.py); None: in memory only (tests)
        self.optuna_name = plan.name  # the store names the Optuna study from it (optuna_store.OptunaStore.study_name)
        if store is None:
            self.optuna_study = optuna.create_study(sampler=sampler, pruner=optuna.pruners.NopPruner(),
                                                    study_name=plan.name, directions=directions)
        else:
            store.reset(plan.name)
            self.optuna_study = store.create(plan.name, directions, sampler)
        self.seeds = list(plan.seeds)
        self.tagged = len(plan.seeds) > 1 or bool(plan.arms)  # plain studies keep plain configs
        self.trials: dict[str, Any] = {}  # Tune trial id -> Optuna trial (sampled points)
        self.configs: dict[str, dict[str, Any]] = {}  # Tune trial id -> the config it was given
        self.queue: list[dict[str, Any]] = [self._config(params, f"{arm}:{point_label(params)}", arm, r)
                                            for arm, params in plan.arms for r in range(len(self.seeds))]
        self.ended: dict[int, dict[str, tuple[Any, list[float] | None]]] = {}  # Optuna number -> Tune id -> (state, values)
        self.told: set[str] = set()
        self.results: dict[int, dict[str, dict[str, float]]] = {}  # Optuna number -> Tune id -> its final RECORDED metrics

    def _config(self, params: dict[str, Any], point_id: str, arm: str, repeat: int) -> dict[str, Any]:
        if not self.tagged:
            return {"params": params}
        return {"params": {**params, "train.seed": self.seeds[repeat]}, "point": {"id": point_id, "arm": arm, "repeat": repeat}}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id in self.configs:
            return self.configs[trial_id]
        if not self.queue:  # a new point: one trial per seed
            optuna_trial = self.optuna_study.ask()
            params = self.space(optuna_trial)["params"]
            self.queue = [{**self._config(params, f"p{optuna_trial.number}", "search", r), "optuna": optuna_trial}
                          for r in range(len(self.seeds))]
        config = self.queue.pop(0)
        if "optuna" in config:
            self.trials[trial_id] = config.pop("optuna")
        self.configs[trial_id] = config
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Optuna keeps intermediate values for single-objective studies only, and one per step (one seed)
        if (isinstance(self.metric, list) or len(self.seeds) > 1 or self.metric not in result or trial_id not in self.trials
                or trial_id in self.told):
            return
        value = result[self.metric]
        if isinstance(value, (int, float)) and math.isfinite(value):
            from optuna.exceptions import UpdateFinishedTrialError

            try:
                self.trials[trial_id].report(value, int(result.get(reports.STEP, result.get("training_iteration", 0))))
            except UpdateFinishedTrialError:
                # told before a driver kill that came before Tune saved this searcher (optuna.db has its end), and
                # resumed: the restored trial says its last result again
                self.told.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.told or trial_id not in self.trials:  # told already, or a fixed arm's (never told)
            return
        from optuna.trial import TrialState

        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(m) for m in metrics] if result else [None]
        finished = bool(result) and int(result.get(reports.STEP, 0)) >= int(result.get(reports.TOTAL_STEPS, 0))
        if error or (result or {}).get(reports.STOP_REASON):
            state, values = TrialState.FAIL, None
        elif not finished or any(v is None or not math.isfinite(v) for v in values):
            state, values = TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
        self.told.add(trial_id)
        optuna_trial = self.trials[trial_id]
        ended = self.ended.setdefault(optuna_trial.number, {})
        ended[trial_id] = (state, values)
        ended_results = self.results.setdefault(optuna_trial.number, {})
        ended_results[trial_id] = {k: result[k] for k in RECORDED if isinstance((result or {}).get(k), (int, float))}
        if len(ended) < len(self.seeds):
            return  # the point's other seeds are still running
        states = [st for st, _ in ended.values()]
        if all(st == TrialState.COMPLETE for st in states):
            state = TrialState.COMPLETE
            values = [sum(v[i] for _, v in ended.values()) / len(ended) for i in range(len(metrics))]
        else:
            state, values = (TrialState.FAIL if TrialState.FAIL in states else TrialState.PRUNED), None
        stored = next((t for t in self.optuna_study.get_trials(deepcopy=False) if t.number == optuna_trial.number), None)
        if stored is not None and stored.state.is_finished():
            # told before a driver kill that came before Tune saved this searcher: optuna.db has it already
            return
        for key, value in recorded(ended_results.values()).items():
            optuna_trial.set_user_attr(key, value)
        try:
            self.optuna_study.tell(optuna_trial, values if values is None or len(values) > 1 else values[0], state=state)
        except RuntimeError as err:  # the grid sampler stops the study after its last point: nothing to do
            logger.info("optuna: %s", err)
        if self.store is not None:
            self.store.save()

    # Tune saves the searcher with its experiment state (`ercstudy resume` restores it). With a store, the Optuna
    # study itself is in optuna.db or its database (saved to the study's storage here): the pickle holds its name and
    # trial ids, not the study, whose storage object holds the database's URL, password included.
    def save(self, checkpoint_path: str) -> None:
        if self.store is not None:
            self.store.save()
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def __getstate__(self) -> dict[str, Any]:
        """What any pickle of the searcher holds: Tune's tuner.pkl (written when the Tuner is made) as well as save().
        With a store, restore() rebuilds the Optuna study from it."""
        state = dict(self.__dict__)
        if self.store is not None and not isinstance(state["optuna_study"], tuple):
            state["optuna_study"] = (getattr(self, "optuna_name", self.optuna_study.study_name), self.optuna_study.sampler)
            state["trials"] = {tid: optuna_trial_id(t) for tid, t in self.trials.items()}
            state["queue"] = [{**c, "optuna": optuna_trial_id(c["optuna"])} if "optuna" in c else c for c in self.queue]
        return state

    def restore(self, checkpoint_path: str) -> None:
        import optuna

        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        store = state.get("store")
        if store is not None:
            name, sampler = state["optuna_study"]
            if not store.fetch():
                raise RuntimeError(f"the study's Optuna store {store.where(name)} is missing: the searcher cannot resume")
            optuna_study = store.load(name, sampler)
            state["optuna_study"] = optuna_study
            state["trials"] = {tid: optuna.Trial(optuna_study, i) for tid, i in state["trials"].items()}
            state["queue"] = [{**c, "optuna": optuna.Trial(optuna_study, c["optuna"])} if "optuna" in c else c
                              for c in state["queue"]]
        self.__dict__.update(state)


RECORDED = ("alpha_star", "eps_mean")  # kept per Optuna trial (user attrs, the mean over its seeds) for importances


def recorded(results: Any) -> dict[str, float]:
    """The mean of each RECORDED metric over the final results of one point's trials that have it."""
    out = {}
    for key in RECORDED:
        values = [r[key] for r in results if key in r and math.isfinite(r[key])]
        if values:
            out[key] = sum(values) / len(values)
    return out


def point_tags(config: dict[str, Any]) -> dict[str, str]:
    """The MLflow tags of a trial's point (studies with repeats or arms): `ercstudy.point` groups one point's
    seeds in the UI, `ercstudy.arm` (`search` or the fixed arm's name) and `ercstudy.repeat`."""
    point = config.get("point") or {}
    return {f"ercstudy.{'point' if k == 'id' else k}": str(v) for k, v in point.items()}


def build_search(plan: StudyPlan, directory: str | None = None) -> StudySearch:
    """The study's searcher; with `directory` (STORAGE/NAME) its Optuna study persists in DIRECTORY/optuna.db."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = plan.study
    metrics = [o.metric for o in study.objectives]
    modes = [o.mode for o in study.objectives]
    return StudySearch(
        plan,
        metric=metrics if study.multi_objective else metrics[0],
        mode=modes if study.multi_objective else modes[0],
        sampler=optuna_sampler(study),
        store=OptunaStore(directory) if directory is not None else None,
    )


def build_scheduler(plan: StudyPlan) -> Any:
    """ASHA on the primary objective (metric and mode come from TuneConfig), or None."""
    from ray.tune.schedulers import ASHAScheduler

    s = plan.study.scheduler
    if s.type == "none":
        return None
    return ASHAScheduler(time_attr=s.time_attr, max_t=plan.budget, grace_period=s.grace_period, reduction_factor=s.reduction_factor)
