"""The study file: a YAML under search_spaces/ validated into a frozen `Study` before any Ray resource starts.

Sections, exactly: name, base, search, objective, scheduler, resources, tracking, and optionally
storage (where the study lives: a shared path or s3:// / gs:// URI; --storage overrides it). `base` is a
trial config (trainables/config.py); `search.params` address it by dotted paths. Every error is
a ConfigError whose message starts with the dotted key (`search.params.moe.top_k.high: ...`).

The space is read in file order: a param that a constraint ties to an already known value (an
earlier param, the base config, or a number) has its range narrowed first (`Study.space`), so
that every point satisfies every constraint. Validation walks the corners of that space here;
search.py draws from the same narrowed ranges with Optuna, so no trial is started only to fail.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ercstudy.trainables.config import ResourcesConfig, TrialConfig, read_yaml
from ercstudy.trainables.lm_eval_adapter import check as harness_check
from ercstudy.trainables.lm_eval_adapter import with_absolute_paths
from ercstudy.trainables.validation import ConfigError, from_dict, require

SECTIONS = ("name", "base", "search", "objective", "scheduler", "resources", "tracking", "storage", "report")
SAMPLERS = ("tpe", "random", "grid", "cmaes")
OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
FLIP = {"<=": ">=", "<": ">", ">=": "<=", ">": "<", "==": "=="}


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    """One searched value: float (low, high, log), int (low, high, step, log) or categorical (choices)."""

    type: Literal["float", "int", "categorical"]  # float, int or categorical
    low: float | None = None  # the range's low end (float, int)
    high: float | None = None  # the range's high end (float, int)
    log: bool = False  # sample on a log scale (float, int)
    step: int | None = None  # an int range's step
    choices: tuple[Any, ...] = ()  # a categorical's values

    def __str__(self) -> str:
        """As an MLflow param of the study's parent run: `float [0.5, 1.2]`, `float [1e-4, 3e-3] log`, `categorical [4, 8]`."""
        if self.type == "categorical":
            return f"categorical [{', '.join(map(str, self.choices))}]"
        extra = " log" if self.log else f" step {self.step}" if self.step else ""
        return f"{self.type} [{self.low:g}, {self.high:g}]{extra}"

    def __post_init__(self) -> None:
        if self.type == "categorical":
            require(len(self.choices) > 0, "choices", "must be a non-empty list for a categorical param")
            require(self.low is None and self.high is None, "low", "a categorical param takes choices, not low/high")
            return
        require(not self.choices, "choices", f"a {self.type} param takes low/high, not choices")
        require(self.low is not None and self.high is not None, "low", f"a {self.type} param needs low and high")
        require(self.low <= self.high, "low", f"must be <= high ({self.high}), got {self.low}")
        require(not self.log or self.low > 0, "log", f"a log-scale param needs low > 0, got {self.low}")
        if self.type == "int":
            require(float(self.low).is_integer() and float(self.high).is_integer(), "low", "an int param needs integer low and high")
            require(self.step is None or self.step >= 1, "step", f"must be >= 1, got {self.step}")
            require(self.step is None or not self.log, "step", "cannot be combined with log: true")
        else:
            require(self.step is None, "step", "only int params take a step")

    @property
    def discrete(self) -> bool:
        return self.type != "float"

    def values(self, limit: int = 16) -> list[Any]:
        """Representative values: all of a discrete param (up to `limit`), else the ends of the range."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            step = self.step or 1
            every = list(range(int(self.low), int(self.high) + 1, step))
            return every if len(every) <= limit else sorted({every[0], every[len(every) // 2], every[-1]})
        return sorted({self.low, self.high})


@dataclass(frozen=True)
class Constraint:
    """`lhs op rhs` over dotted trial-config paths and numbers, e.g. `moe.top_k <= moe.num_experts`."""

    text: str
    lhs: str | float
    op: str
    rhs: str | float

    @classmethod
    def parse(cls, text: str, where: str) -> Constraint:
        m = re.fullmatch(r"\s*(\S+)\s*(<=|>=|==|<|>)\s*(\S+)\s*", str(text))
        if not m:
            raise ConfigError(where, f"must read `A op B` with op one of {', '.join(OPS)} and A, B dotted paths or numbers, got {text!r}")

        def term(s: str) -> str | float:
            try:
                return float(s)
            except ValueError:
                return s

        return cls(str(text).strip(), term(m.group(1)), m.group(2), term(m.group(3)))

    def paths(self) -> list[str]:
        return [t for t in (self.lhs, self.rhs) if isinstance(t, str)]

    def holds(self, values: dict[str, Any]) -> bool:
        a = self.lhs if isinstance(self.lhs, float) else values[self.lhs]
        b = self.rhs if isinstance(self.rhs, float) else values[self.rhs]
        return OPS[self.op](a, b)

    def bound_for(self, path: str, known: dict[str, Any]) -> tuple[str, float] | None:
        """(op, value) that `path` must satisfy given the known other side, or None if that is not known yet."""
        if self.lhs == path:
            other, op = self.rhs, self.op
        elif self.rhs == path:
            other, op = self.lhs, FLIP[self.op]
        else:
            return None
        if isinstance(other, str):
            if other not in known:
                return None
            other = known[other]
        return op, other


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    sampler: Literal["tpe", "random", "grid", "cmaes"] = "tpe"  # Optuna's sampler: TPE, random, grid (every point of the space), CMA-ES (pip install cmaes)
    num_trials: int = 8  # points the sampler proposes (the grid: at most its points); each runs at every seed
    max_concurrent: int = 0  # 0: as many as the cluster's resources allow
    seed: int = 0  # the sampler's seed
    params: dict[str, ParamSpec] = field(default_factory=dict)  # searched values: dotted trial-config path -> param (below)
    constraints: tuple[str, ...] = ()  # `A op B` over dotted paths and numbers, e.g. `moe.top_k <= moe.num_experts`; every point satisfies them
    # each point runs at `repeats` seeds (train.seed = base seed + r, which also sets the data order);
    # the sampler is told the mean over them
    repeats: int = 1
    # fixed arms next to the searched space, run at the same seeds and never shown to the sampler:
    # name -> {dotted path: value, or a list of values (crossed)}, e.g. baseline: {erc.enabled: false}
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: str | None = None  # the arm the report pairs every point with (default: the first arm)

    def __post_init__(self) -> None:
        require(self.num_trials >= 1, "num_trials", f"must be >= 1, got {self.num_trials}")
        require(self.max_concurrent >= 0, "max_concurrent", f"must be >= 0 (0 = as many as resources allow), got {self.max_concurrent}")
        require(self.repeats >= 1, "repeats", f"must be >= 1, got {self.repeats}")

    @property
    def baseline_arm(self) -> str | None:
        return self.baseline or next(iter(self.arms), None)


@dataclass(frozen=True)
class Objective:
    metric: str  # a reported metric, e.g. eval/loss, alpha_star, harness/TASK/acc
    mode: Literal["min", "max"]  # minimize or maximize it


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    type: Literal["none", "asha"] = "none"  # ASHA stops the weaker trials early on the (primary) objective; none runs every trial to its end
    time_attr: Literal["step", "tokens"] = "step"  # ASHA's clock: optimizer steps or trained tokens
    grace_period: int = 1  # in time_attr units: no trial is stopped before it
    reduction_factor: float = 3.0  # ASHA keeps 1 / reduction_factor of the trials at each rung

    def __post_init__(self) -> None:
        require(self.grace_period >= 1, "grace_period", f"must be >= 1, got {self.grace_period}")
        require(self.reduction_factor > 1, "reduction_factor", f"must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite in the working directory
    experiment: str | None = None  # default: the study name


@dataclass(frozen=True)
class Study:
    name: str
    base: dict[str, Any]  # the trial config as a dict (validated: TrialConfig.from_dict(base) works)
    search: SearchConfig
    objectives: tuple[Objective, ...]
    scheduler: SchedulerConfig
    tracking: TrackingConfig
    constraints: tuple[Constraint, ...]
    source: str = ""
    storage: str | None = None  # the study's `storage:` (platform/cluster/storage.py); --storage overrides it
    overrides: tuple[str, ...] = ()  # `key=value`s from the command line (overrides.py), applied to the file
    report_metrics: tuple[str, ...] | None = None  # `report: {metrics: [...]}`: what the report compares besides the objective
    spec: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # the file as parsed, overrides applied

    @property
    def objective(self) -> Objective:
        """The primary objective (ASHA and the leaderboard order use it)."""
        return self.objectives[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @functools.cached_property
    def base_config(self) -> TrialConfig:
        """The base as a trial config, parsed once (the space reads it for every point)."""
        return TrialConfig.from_dict(self.base)

    @functools.cached_property
    def fixed_values(self) -> dict[str, Any]:
        """The base-config values that constraints compare searched params with (paths not searched)."""
        return {p: config_value(self.base_config, p) for c in self.constraints for p in c.paths() if p not in self.search.params}

    def trial_config(self, params: dict[str, Any]) -> TrialConfig:
        """The trial config of one sampled point: the base with the params set."""
        return TrialConfig.from_dict(apply_params(self.base, params))

    def space(self, path: str, known: dict[str, Any]) -> ParamSpec | list[Any]:
        """The range (or choices) of the searched param `path` that the constraints leave, given the
        values drawn so far (`known`, earlier params in file order); may be empty (see `is_empty`)."""
        known = {**self.fixed_values, **known}
        return narrow(self.search.params[path], [b for c in self.constraints if (b := c.bound_for(path, known)) is not None])

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


# ---------------------------------------------------------------------------------------------
# Paths into the trial config


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for path, value in params.items():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def config_value(cfg: TrialConfig, path: str) -> Any:
    node: Any = cfg
    for key in path.split("."):
        node = getattr(node, key)
    return node


def field_type(path: str) -> Any:
    """The annotation of a trial-config field, or ConfigError if the path does not exist."""
    import dataclasses
    import typing

    cls: Any = TrialConfig
    keys = path.split(".")
    for i, key in enumerate(keys):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if key not in names:
            import difflib

            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {'.'.join(keys[:i] + [close[0]])!r}?)" if close else ""
            raise ConfigError(f"search.params.{path}", f"not a trial-config path{hint}; {'.'.join(keys[:i]) or 'top level'} has: {', '.join(names)}")
        tp = hints[key]
        if i < len(keys) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"search.params.{path}", f"{'.'.join(keys[: i + 1])} is a value, not a section")
            cls = tp
        elif dataclasses.is_dataclass(tp):
            raise ConfigError(f"search.params.{path}", "is a whole section; search one of its fields")
    return tp


# ---------------------------------------------------------------------------------------------
# Loading


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {value!r}")
    return value


def _objectives(value: Any) -> tuple[Objective, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or any(not isinstance(i, dict) for i in items):
        raise ConfigError("objective", "must be {metric: NAME, mode: min|max} or a list of them (multi-objective)")
    out = []
    for i, item in enumerate(items):
        where = "objective" if not isinstance(value, list) else f"objective[{i}]"
        unknown = set(item) - {"metric", "mode"}
        require(not unknown, f"{where}.{next(iter(unknown), '')}", "unknown key; allowed: metric, mode")
        require(isinstance(item.get("metric"), str) and item["metric"], f"{where}.metric", "must name a reported metric, e.g. eval/loss")
        require(item.get("mode") in ("min", "max"), f"{where}.mode", f"must be 'min' or 'max', got {item.get('mode')!r}")
        out.append(Objective(item["metric"], item["mode"]))
    return tuple(out)


def parse_study(data: Any, *, source: str = "", overrides: tuple[str, ...] = ()) -> Study:
    if not isinstance(data, dict):
        raise ConfigError("", f"a study must be a mapping with sections {', '.join(SECTIONS)}, got {type(data).__name__}")
    for key in data:
        if key not in SECTIONS:
            import difflib

            close = difflib.get_close_matches(str(key), SECTIONS, n=1)
            raise ConfigError(str(key), f"unknown section{f' (did you mean {close[0]!r}?)' if close else ''}; allowed: {', '.join(SECTIONS)}")
    name = data.get("name")
    require(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or "") is not None, "name",
            f"must be a name of letters, digits, '_', '.', '-', got {name!r}")
    require("objective" in data, "objective", "missing: say what to optimize, e.g. {metric: eval/loss, mode: min}")

    # base + resources: the study's resources section overrides base.resources
    base = copy.deepcopy(_section(data, "base"))
    resources = _section(data, "resources")
    if resources:
        from_dict(ResourcesConfig, {**(base.get("resources") or {}), **resources}, prefix="resources")
        base["resources"] = {**(base.get("resources") or {}), **resources}
    base = with_absolute_paths(base)  # eval.harness's directories, read from here: the trials run elsewhere
    base_cfg = from_dict(TrialConfig, base, prefix="base")
    if base_cfg.data.path and isinstance(base.get("data"), dict):
        base["data"]["path"] = base_cfg.data.path  # absolute, read from here (DataConfig): the trials run elsewhere

    search_raw = dict(_section(data, "search"))
    params_raw = search_raw.pop("params", None) or {}
    constraints_raw = search_raw.pop("constraints", None) or []
    arms_raw = search_raw.pop("arms", None) or {}
    baseline_raw = search_raw.pop("baseline", None)
    require(isinstance(params_raw, dict), "search.params", "must be a mapping of dotted trial-config paths to param specs")
    require(isinstance(constraints_raw, list), "search.constraints", "must be a list of `A op B` strings")
    search = from_dict(SearchConfig, search_raw, prefix="search")
    params: dict[str, ParamSpec] = {}
    for path, spec in params_raw.items():
        where = f"search.params.{path}"
        tp = field_type(str(path))
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        param = from_dict(ParamSpec, spec, prefix=where)
        from ercstudy.trainables.validation import _coerce

        for v in ([param.low, param.high] if param.type != "categorical" else list(param.choices)):
            if param.type == "int" and v is not None:
                v = int(v)
            _coerce(v, tp, where)  # the field's own type check: e.g. a float range for an int field
        if param.type == "float" and tp is int:
            raise ConfigError(where, "is an integer field: use type int")
        params[str(path)] = param
    search = SearchConfig(sampler=search.sampler, num_trials=search.num_trials, max_concurrent=search.max_concurrent,
                          seed=search.seed, params=params, constraints=tuple(map(str, constraints_raw)),
                          repeats=search.repeats, arms=_arms(arms_raw, base, params), baseline=baseline_raw)
    require(search.baseline is None or search.baseline in search.arms, "search.baseline",
            f"must name one of search.arms ({', '.join(search.arms) or 'none given'}), got {search.baseline!r}")
    require(search.repeats == 1 or "train.seed" not in params, "search.params.train.seed",
            "is set by search.repeats (seeds base + 0 .. repeats - 1); search other params, or use repeats: 1")
    constraints = tuple(Constraint.parse(c, f"search.constraints[{i}]") for i, c in enumerate(constraints_raw))
    for i, c in enumerate(constraints):
        for p in c.paths():
            if p not in params:
                try:
                    config_value(base_cfg, p)
                except AttributeError:
                    raise ConfigError(f"search.constraints[{i}]", f"{p!r} is not a trial-config path") from None
        require(any(p in params for p in c.paths()), f"search.constraints[{i}]",
                f"{c.text!r} constrains no searched param (the base config alone must already satisfy the trial config's own checks)")
    objectives = _objectives(data["objective"])
    if search.sampler == "cmaes":
        require(len(objectives) == 1, "search.sampler", "cmaes optimizes one objective; use tpe, random or grid for a list of objectives")
        require(all(p.type != "categorical" for p in params.values()), "search.sampler",
                "cmaes searches int and float params only; use tpe or random with categorical params")
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError("search.sampler", "cmaes needs the `cmaes` package (pip install cmaes)") from None
    if search.sampler == "grid":
        require(all(p.discrete for p in params.values()), "search.sampler",
                "grid needs discrete params (int or categorical); give float params as categorical choices")
    require(bool(params), "search.params", "is empty: give at least one param to search (or use `ercstudy train` for one trial)")

    scheduler = from_dict(SchedulerConfig, _section(data, "scheduler"), prefix="scheduler")
    require(scheduler.type == "none" or (search.repeats == 1 and not search.arms), "scheduler.type",
            "must be none with search.repeats > 1 or search.arms: ASHA stops single seeds on one noisy value, so a "
            "point's mean would average unequal budgets and an arm's pairs would miss seeds; every trial runs its full budget")
    tracking = from_dict(TrackingConfig, _section(data, "tracking"), prefix="tracking")
    storage = data.get("storage")
    require(storage is None or (isinstance(storage, str) and storage.strip() != ""), "storage",
            f"must be a path every node mounts or a URI such as s3://bucket/prefix, got {storage!r}")
    report = _section(data, "report")
    unknown = set(report) - {"metrics"}
    require(not unknown, f"report.{sorted(unknown)[0] if unknown else ''}", "unknown key; allowed: metrics")
    metrics = report.get("metrics")
    require(metrics is None or (isinstance(metrics, list) and all(isinstance(m, str) for m in metrics)), "report.metrics",
            f"must be a list of reported metric names, got {metrics!r}")
    study = Study(name, base, search, objectives, scheduler, tracking, constraints, source, storage, overrides=overrides,
                  report_metrics=tuple(metrics) if metrics is not None else None, spec=copy.deepcopy(data))
    check_space(study)
    if any(o.metric.startswith("harness/") for o in objectives):
        require(scheduler.type == "none" or base_cfg.eval.harness.at != "final", "scheduler.type",
                "asha compares trials on the objective at every rung, and with base.eval.harness.at: final a harness "
                "metric exists at the last step only: set eval.harness.at to a number of steps, or scheduler type none")
    try:  # tasks, data files and tokenizer before anything starts (lm-eval indexes its tasks: a few seconds)
        known = reported_metrics(base_cfg) | harness_check(base_cfg)
    except ConfigError as err:
        raise err.under("base") from None
    checked = [("objective.metric" if len(objectives) == 1 else f"objective[{i}].metric", o.metric) for i, o in enumerate(objectives)]
    checked += [(f"report.metrics[{i}]", m) for i, m in enumerate(metrics or [])]
    for where, metric in checked:
        if metric not in known:
            import difflib

            close = difflib.get_close_matches(metric, sorted(known), n=1)
            raise ConfigError(where, f"no trial reports {metric!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                                     f"reported: {', '.join(sorted(k for k in known if '/layer' not in k))}")
    return study


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> Study:
    """A study file, with command-line overrides (`base.erc.alpha=0.5`, overrides.py) applied before validation."""
    from ercstudy.platform.study.overrides import apply_overrides

    data = apply_overrides(read_yaml(path), overrides)
    try:
        return parse_study(data, source=str(path), overrides=tuple(overrides))
    except ConfigError as err:
        raise ConfigError(err.path, f"{err.reason} (in {path})") from None


def resolved_spec(study: Study) -> dict[str, Any]:
    """The study as a file that `ercstudy run` accepts as it is: its sections as written (overrides applied), the
    base as the whole trial config every trial starts from, defaults included (the resources section merged in)."""
    spec = {k: v for k, v in copy.deepcopy(study.spec or {"name": study.name}).items() if k != "resources"}
    spec["base"] = study.base_config.to_dict()
    return spec


def reported_metrics(cfg: TrialConfig) -> set[str]:
    """Every metric name a trial of this config reports (objectives must be among them)."""
    from ercstudy.trainables.specialization import LAYER_METRICS, ROUTER_METRICS

    names = {"step", "total_steps", "tokens", "lm_loss", "lb_loss", "z_loss", "erc_loss", "grad_norm", "lr", "tokens_per_s", "mfu",
             "peak_memory_mb"}
    layer = [m for m in LAYER_METRICS if cfg.moe.kind == "routed" or m not in ROUTER_METRICS]
    layer += ["domain_nmi"] if cfg.data.kind == "synthetic" else []
    for m in layer:
        names.add(m)
        names.update(f"{m}/layer{i}" for i in range(cfg.num_moe_layers))
    if cfg.eval.sequences:
        names.update({"eval/loss", "eval/ppl"})
        if cfg.data.kind == "synthetic":
            names.update(f"eval/loss/domain{d}" for d in range(cfg.data.num_domains))
        else:
            from ercstudy.trainables.shards import ShardMeta

            try:
                names.update(f"eval/loss/{d}" for d in ShardMeta.read(cfg.data.path).domains)
            except Exception:
                pass
    if cfg.eval.mc_items and cfg.data.kind == "synthetic":
        names.update({"eval/mc_domain/acc", "eval/mc_domain/acc_norm"})
    return names


# ---------------------------------------------------------------------------------------------
# The constrained space (search.py draws from it with Optuna)


def narrow(param: ParamSpec, bounds: list[tuple[str, float]]) -> ParamSpec | list[Any]:
    """The param's range (int/float) or choices (categorical) restricted to the bounds; may be empty."""
    if param.type == "categorical":
        return [c for c in param.choices if all(OPS[op](c, v) for op, v in bounds)]
    low, high = float(param.low), float(param.high)
    for op, v in bounds:
        if param.type == "int":
            v_lo, v_hi = (math.floor(v) + 1 if op == ">" else math.ceil(v)), (math.ceil(v) - 1 if op == "<" else math.floor(v))
        else:
            v_lo = math.nextafter(v, math.inf) if op == ">" else v
            v_hi = math.nextafter(v, -math.inf) if op == "<" else v
        if op in (">", ">=", "=="):
            low = max(low, v_lo)
        if op in ("<", "<=", "=="):
            high = min(high, v_hi)
    if param.type == "int" and param.step:
        # keep the grid of the original range: low + k * step
        first = int(param.low) + math.ceil((low - param.low) / param.step) * param.step
        last = int(param.low) + math.floor((high - param.low) / param.step) * param.step
        low, high = first, last
    return ParamSpec(type=param.type, low=low, high=high, log=param.log, step=param.step)


def is_empty(space: ParamSpec | list[Any]) -> bool:
    return (len(space) == 0) if isinstance(space, list) else space.low > space.high


def check_space(study: Study) -> None:
    """Every corner of the space leaves each param a non-empty range, and every point is a valid trial config;
    so is every fixed-arm point."""
    for point in corner_points(study):
        try:
            study.trial_config(point)
        except ConfigError as err:
            raise ConfigError(err.path, f"{err.reason}, for the searched point {point} "
                              f"(add a search.constraints entry so that the search avoids it)") from None
    for name, point in arm_points(study):
        try:
            study.trial_config(point)
        except ConfigError as err:
            raise ConfigError(f"search.arms.{name}", f"{err.path}: {err.reason}, for the arm's point {point}") from None


def corner_points(study: Study, limit: int = 4096, *, full: bool = False) -> list[dict[str, Any]]:
    """Representative points of the space (discrete values, ends of ranges), constraints applied in order.

    full: every value of int params (the grid sampler's points), not a sample of wide ranges.
    """
    points: list[dict[str, Any]] = [{}]
    for path in study.search.params:
        nxt = []
        for point in points:
            space = study.space(path, point)
            if is_empty(space):
                raise ConfigError(f"search.params.{path}", f"no value satisfies the constraints when {point}: widen its range or fix search.constraints")
            values = space if isinstance(space, list) else space.values(limit=10**6 if full else 16)
            nxt.extend({**point, path: v} for v in values)
        points = nxt[:limit]
    return points


# ---------------------------------------------------------------------------------------------
# Fixed arms


def _arms(raw: Any, base: dict[str, Any], params: dict[str, ParamSpec]) -> dict[str, dict[str, Any]]:
    """search.arms checked: names, trial-config paths, values of the fields' types (a list = values crossed)."""
    from ercstudy.trainables.validation import _coerce

    require(isinstance(raw, dict), "search.arms", "must be a mapping: arm name -> {dotted path: value or [values]}")
    out: dict[str, dict[str, Any]] = {}
    for name, fixed in raw.items():
        where = f"search.arms.{name}"
        require(re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", str(name)) is not None and name != "search", where,
                "an arm name is letters, digits, '_', '-' (not 'search': that names the sampled points)")
        require(isinstance(fixed, dict) and bool(fixed), where, "must be a non-empty mapping of dotted trial-config paths to values")
        for path, value in fixed.items():
            require(path != "train.seed", f"{where}.train.seed", "arms run at the study's seeds (search.repeats); do not fix it")
            tp = field_type(str(path))
            for v in value if isinstance(value, list) else [value]:
                _coerce(v, tp, f"{where}.{path}")
        out[str(name)] = dict(fixed)
    return out


def arm_points(study: Study) -> list[tuple[str, dict[str, Any]]]:
    """(arm name, params) of every fixed-arm point, lists crossed, in file order (seeds not included)."""
    out = []
    for name, fixed in study.search.arms.items():
        combos: list[dict[str, Any]] = [{}]
        for path, value in fixed.items():
            combos = [{**c, path: v} for c in combos for v in (value if isinstance(value, list) else [value])]
        out.extend((name, c) for c in combos)
    return out


def point_label(params: dict[str, Any]) -> str:
    """A point as a short stable text: `erc.enabled=False, moe.num_experts=16` (MLflow tags, report rows)."""
    return ", ".join(f"{p}={v}" for p, v in params.items() if p != "train.seed")
