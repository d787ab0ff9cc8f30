"""Parameter importances of a study, from its persisted Optuna study (optuna_store.py), with PED-ANOVA
(`optuna.importance.PedAnovaImportanceEvaluator`: how much each param's distribution among the best points
differs from its distribution among all; deterministic, no random draw, so nothing to seed). The best set is
Optuna's default top 10%, but never fewer than TOP_MIN points: on a small study the top 10% is one point, whose
"distribution" says nothing. Optuna advises at least 5 points in the best set; below that the report says the
importances are indicative.

Targets: each objective, and the point's mean final `alpha_star` and `eps_mean` where the searcher recorded
them (StudySearch keeps them as the Optuna trials' user attrs). PED-ANOVA ranks params by what it takes to
reach the *low* end of a target, so a target to maximize enters negated: the importance for a high eps
(router rows far apart) and for a low alpha* (router and experts tightly coupled).

Params whose range a constraint narrowed are asked under names such as `moe.top_k|1..4` (search.py); here
they count as one param over its full range, so that every trial holds it.
"""

from __future__ import annotations

import warnings
from typing import Any

from ercstudy.platform.study.spec import Study

TOP_MIN = 2  # points in the best set, at least
ADVISED_TOP = 5  # Optuna's advice for a stable analysis
MIN_TRIALS = 3 * TOP_MIN  # completed points: the best set a third of them at most
METHOD = "PED-ANOVA"
TARGETS = {"alpha_star": ("alpha* (low)", 1.0), "eps_mean": ("eps (high)", -1.0)}  # user attr -> (label, sign)


def distributions(study: Study) -> dict[str, Any]:
    """Each searched param's full range as an Optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for path, p in study.search.params.items():
        if p.type == "categorical":
            out[path] = CategoricalDistribution(list(p.choices))
        elif p.type == "int":
            out[path] = IntDistribution(int(p.low), int(p.high), log=p.log, step=1 if p.log else (p.step or 1))
        else:
            out[path] = FloatDistribution(p.low, p.high, log=p.log)
    return out


def _normalized(study: Study, trials: list[Any]) -> list[tuple[dict[str, Any], Any]]:
    """(params under their plain names, the frozen trial) per trial."""
    dists = distributions(study)
    out = []
    for t in trials:
        params = {name.split("|", 1)[0]: v for name, v in t.params.items()}
        out.append(({k: v for k, v in params.items() if k in dists}, t))
    return out


def param_importances(study: Study, trials: list[Any]) -> dict[str, dict[str, float] | str]:
    """Target label -> {param: importance} (normalized to sum 1, largest first), or why there is none.

    trials: the Optuna study's frozen trials (optuna_study.get_trials()); only COMPLETE ones count.
    """
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState

    dists = distributions(study)
    done = _normalized(study, [t for t in trials if t.state == TrialState.COMPLETE])
    targets: list[tuple[str, Any]] = []
    for i, o in enumerate(study.objectives):
        sign = 1.0 if o.mode == "min" else -1.0
        targets.append((f"{o.metric} ({'low' if o.mode == 'min' else 'high'})", lambda t, i=i, sign=sign: sign * t.values[i]))
    for key, (label, sign) in TARGETS.items():
        targets.append((label, lambda t, key=key, sign=sign: sign * t.user_attrs[key]))
    out: dict[str, dict[str, float] | str] = {}
    for label, target in targets:
        have = [(params, t) for params, t in done if _has(t, target)]
        if not have:
            out[label] = "not recorded"
            continue
        if len(have) < MIN_TRIALS:
            out[label] = f"{len(have)} completed points, fewer than {MIN_TRIALS}"
            continue
        # one single-objective study per target, its params under their plain names and full ranges
        s = optuna.create_study(direction="minimize")
        for params, t in have:
            s.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params}, value=target(t)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = get_param_importances(s, evaluator=PedAnovaImportanceEvaluator(target_quantile=target_quantile(len(have))))
        out[label] = {k: float(v) for k, v in imp.items()}
    return out


def top_count(n: int) -> int:
    """Points in the best set of n: Optuna's default 10%, at least TOP_MIN."""
    return max(TOP_MIN, -(-n // 10))  # ceil(n / 10) in integers


def target_quantile(n: int) -> float:
    """The PED-ANOVA quantile whose best set holds exactly top_count(n) of n points (Optuna keeps the
    ceil(q n) best), half a point below the count so that rounding cannot add one."""
    return (top_count(n) - 0.5) / n


def _has(t: Any, target: Any) -> bool:
    try:
        v = float(target(t))
    except (KeyError, IndexError, TypeError):
        return False
    return v == v and abs(v) != float("inf")


def importance_lines(study: Study, optuna_study: Any, *, where: str) -> tuple[list[str], dict[str, Any]]:
    """The report's importance section and its data (fits.json), or one line that says why there is none."""
    from ercstudy.platform.study.tables import markdown_table

    head = ["", f"## Parameter importances ({METHOD})", ""]
    if optuna_study is None:
        return head + [f"No Optuna store ({where} is missing: the study predates it): no importances."], {}
    result = param_importances(study, optuna_study.get_trials(deepcopy=False))
    ready = {label: imp for label, imp in result.items() if isinstance(imp, dict)}
    n_done = sum(1 for t in optuna_study.get_trials(deepcopy=False) if t.state.name == "COMPLETE")
    if not ready:
        return head + [f"Too few completed points for importances: {n_done} (importances need at least {MIN_TRIALS}; "
                       f"a point is one Optuna trial, the mean of its seeds)."], result
    params = list(dict.fromkeys(p for imp in ready.values() for p in imp))
    rows = [{"param": p, **{label: f"{imp.get(p, 0.0):.3f}" for label, imp in ready.items()}} for p in params]
    k = top_count(n_done)
    caveat = f" Indicative only: Optuna advises at least {ADVISED_TOP} points in the best set." if k < ADVISED_TOP else ""
    lines = head + [f"Share of each searched param in reaching the good end of each target over {n_done} completed points "
                    f"(PED-ANOVA: the best {k} points against all; deterministic), read from `{where}`.{caveat}", "",
                    *markdown_table(rows, ["param", *ready])]
    skipped = {label: why for label, why in result.items() if isinstance(why, str)}
    if skipped:
        lines += ["", "Not computed: " + "; ".join(f"{label}: {why}" for label, why in skipped.items()) + "."]
    return lines, result
