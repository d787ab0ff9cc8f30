"""The order of a study's trials, best first: one ranking for the driver's leaderboard (runner.py)
and for `ercstudy report` (report.py).

Completed trials with a finite objective come first. Single objective: by the objective.
Several objectives: the Pareto front of the completed trials first (rows get `pareto`: True or
False), then by the first objective. Trials stopped early, stopped by a non-finite loss or
failed follow, in their given order.
"""

from __future__ import annotations

import math
from typing import Any

from ercstudy.platform.study.spec import Study


def _value(row: dict[str, Any], metric: str) -> float | None:
    v = row.get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def metric_columns(study: Study, final: dict[str, Any]) -> dict[str, Any]:
    """A trial's leaderboard metrics: the objectives, then its lm-eval results (`harness/<task>/<metric>`, eval.harness)."""
    row = {o.metric: final.get(o.metric) for o in study.objectives}
    row.update({k: v for k, v in sorted(final.items()) if k.startswith("harness/") and k not in row and _value(final, k) is not None})
    return row


def pareto_front(study: Study, rows: list[dict[str, Any]]) -> set[int]:
    """Indices of the completed rows that no other completed row dominates on every objective."""
    points = {}
    for i, r in enumerate(rows):
        values = [_value(r, o.metric) for o in study.objectives]
        if r.get("status") == "completed" and None not in values:
            points[i] = tuple(v if o.mode == "min" else -v for v, o in zip(values, study.objectives))  # all minimized

    def dominated(a: tuple[float, ...], b: tuple[float, ...]) -> bool:  # b is nowhere worse than a, and somewhere better
        return all(x <= y for x, y in zip(b, a)) and b != a

    return {i for i, a in points.items() if not any(dominated(a, b) for j, b in points.items() if j != i)}


def rank(study: Study, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows (dicts with `status` and the objectives' metrics) best first; multi-objective rows get `pareto`."""
    o = study.objective
    sign = 1 if o.mode == "min" else -1

    def done(r: dict[str, Any]) -> bool:
        return r.get("status") == "completed" and _value(r, o.metric) is not None

    if not study.multi_objective:
        return sorted(rows, key=lambda r: (not done(r), sign * _value(r, o.metric) if done(r) else 0.0))
    front = pareto_front(study, rows)
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    return sorted(rows, key=lambda r: (not done(r), not r["pareto"], sign * _value(r, o.metric) if done(r) else 0.0))


def title(study: Study) -> str:
    """What the order is, as the leaderboard's heading says it."""
    if study.multi_objective:
        objs = ", ".join(f"{o.metric} {o.mode}" for o in study.objectives)
        return f"Pareto front of {objs} first, then by {study.objective.metric}"
    return f"{study.objective.metric}, {study.objective.mode}; best first"
