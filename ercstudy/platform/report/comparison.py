"""Comparing a study's points as a reviewer asks: each point's mean over its seeds with a 95% confidence
interval, and its paired difference to the baseline arm at equal seeds, with its interval, p-value and
whether it is significant (Holm-corrected over the points compared); and which trials a best-alpha
comparison may use (ERC on only, at equal other params, or said to be confounded).

Trials are the dicts of report.study_trials: `point`, `arm`, `seed`, the searched params, the objective.
Intervals are Student-t intervals over seeds (n - 1 degrees of freedom; none for a single seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ercstudy.platform.study.spec import Study, config_value

LEVEL = 0.95
NOT_ALPHA = ("erc.alpha", "moe.num_experts", "train.seed")  # what a best-alpha group may vary in


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # nan when n < 2
    high: float
    n: int
    p: float = math.nan  # two-sided p-value of mean = 0 (paired differences only)


def t_interval(values: list[float], *, level: float = LEVEL) -> Interval:
    """Mean and Student-t confidence interval of `values`, and the p-value of a zero mean (one-sample t test)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    if se == 0:
        p = 0.0 if mean != 0 else 1.0
    else:
        p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    return Interval(mean, mean - half, mean + half, n, p)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan stays nan and does not count as a test)."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        out[i] = running
    return out


def baseline_of(study: Study, trial: dict[str, Any], arms: dict[str, list[dict[str, Any]]]) -> str | None:
    """The baseline arm's point that `trial` pairs with: the one that agrees with it on every searched param
    the arm fixes (e.g. moe.num_experts), so that a point is compared at its own expert count."""
    name = study.search.baseline_arm
    if name is None:
        return None
    for point, ts in arms.get(name, {}).items():
        fixed = {p: v for p, v in ts[0]["params"].items() if p in study.search.params}
        if all(trial["params"].get(p) == v for p, v in fixed.items()):
            return point
    return None


def confounders(study: Study, point: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """Searched params besides ERC's own (erc.*) and the seed in which a point differs from its baseline (whose
    unset params are the base config's): a paired difference then mixes ERC with them."""
    out = []
    for p in study.search.params:
        if not (p.startswith("erc.") or p == "train.seed"):
            base = config_value(study.base_config, p)
            if point["params"].get(p, base) != baseline["params"].get(p, base):
                out.append(p)
    return out


# What a report compares besides the objective (the study's `report.metrics`, else these): the paper's claims are about
# the coupling and the cost, not the loss alone. Cost metrics are compared as ratios to the baseline arm.
DEFAULT_METRICS = ("alpha_star", "diag_dominance", "eps_mean", "domain_nmi", "lb_loss", "tokens_per_s", "peak_memory_mb")
COST_METRICS = ("tokens_per_s", "peak_memory_mb")
MODES = {"alpha_star": "min", "diag_dominance": "max", "domain_nmi": "max", "lb_loss": "min", "tokens_per_s": "max",
         "peak_memory_mb": "min", "eps_mean": "max"}  # which way is better, for `significant`


def point_rows(study: Study, trials: list[dict[str, Any]], metric: str | None = None, *, mode: str | None = None,
               ratio: bool = False) -> list[dict[str, Any]]:
    """One row per point (sampled or arm): its seeds' mean and interval of `metric` (default: the objective), and its
    paired difference to the baseline at equal seeds (with `ratio`, the paired ratio to it, tested against 1), with
    the params other than ERC's that differ from the baseline's (`confounded_by`). Only completed trials with a
    finite value count."""
    if metric is None:
        metric, mode = study.objective.metric, study.objective.mode
    mode = mode or MODES.get(metric, "min")
    done = [t for t in trials if t["status"] == "completed" and isinstance(t.get(metric), (int, float)) and math.isfinite(t[metric])]
    by_point: dict[str, list[dict[str, Any]]] = {}
    for t in done:
        by_point.setdefault(t["point"], []).append(t)
    by_arm: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for point, ts in by_point.items():
        by_arm.setdefault(ts[0]["arm"], {})[point] = ts
    rows = []
    for point, ts in by_point.items():
        ci = t_interval([t[metric] for t in ts])
        row = {"point": point, "arm": ts[0]["arm"], "seeds": ci.n, "mean": ci.mean, "ci_low": ci.low, "ci_high": ci.high}
        base = None if ts[0]["arm"] == study.search.baseline_arm else baseline_of(study, ts[0], by_arm)
        if base is not None:
            ours = {t["seed"]: t[metric] for t in ts}
            theirs = {t["seed"]: t[metric] for t in by_point[base]}
            common = sorted(set(ours) & set(theirs))
            if common and not (ratio and any(theirs[s] == 0 for s in common)):
                d = t_interval([ours[s] / theirs[s] - 1 if ratio else ours[s] - theirs[s] for s in common])
                shift = 1.0 if ratio else 0.0  # a ratio is reported as ours / theirs, its test as ratio - 1 = 0
                row.update({"baseline": base, "pairs": d.n, "diff": d.mean + shift, "diff_low": d.low + shift,
                            "diff_high": d.high + shift, "p": d.p,
                            "confounded_by": ", ".join(confounders(study, ts[0], by_point[base][0]))})
        rows.append(row)
    for row, p_holm in zip(rows, holm([r.get("p", math.nan) for r in rows])):
        if "diff" in row:
            row["p_holm"] = p_holm
            neutral = 1.0 if ratio else 0.0
            better = row["diff"] < neutral if mode == "min" else row["diff"] > neutral
            row["significant"] = (("better" if better else "worse") if math.isfinite(p_holm) and p_holm < 1 - LEVEL
                                  else "no" if math.isfinite(p_holm) else "n/a (1 pair)")
    order = {"min": 1, "max": -1}[mode]
    return sorted(rows, key=lambda r: (r["arm"] != "search", order * r["mean"]))


@dataclass(frozen=True)
class AlphaGroup:
    """Trials whose best alpha can be compared: ERC on, one expert count, equal other searched params."""

    label: str  # e.g. "experts=16, erc.epsilon=auto"
    trials: list[dict[str, Any]]
    confounded: list[str]  # searched params that differ between these trials besides alpha and the seed


def alpha_groups(study: Study, trials: list[dict[str, Any]]) -> list[AlphaGroup]:
    """Best-alpha groups: ERC-on trials (the baseline has no alpha) by expert count and the other searched
    params. Where those params take a different value in (almost) every trial (a TPE-sampled lr), grouping
    leaves no group with 3 alphas: the trials of one expert count are pooled and the group says it is confounded."""
    on = [t for t in trials if t.get("alpha") is not None]
    others = [p for p in study.search.params if p not in NOT_ALPHA]
    groups = []
    by_n: dict[int, list[dict[str, Any]]] = {}
    for t in on:
        by_n.setdefault(t["num_experts"], []).append(t)
    for n, ts in sorted(by_n.items()):
        sub: dict[tuple, list[dict[str, Any]]] = {}
        for t in ts:
            sub.setdefault(tuple(t["params"].get(p) for p in others), []).append(t)
        if len(sub) == 1 or all(len({t["alpha"] for t in g}) >= 3 for g in sub.values()):
            for key, g in sub.items():
                label = ", ".join([f"experts={n}", *(f"{p}={v}" for p, v in zip(others, key))])
                groups.append(AlphaGroup(label, g, []))
        else:
            varied = [p for i, p in enumerate(others) if len({k[i] for k in sub}) > 1]
            groups.append(AlphaGroup(f"experts={n}", ts, varied))
    return groups
