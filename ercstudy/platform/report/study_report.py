"""`ercstudy report NAME`: the leaderboard, comparison plots and scaling fits of a study.

The trials are read back from MLflow (the study's parent run and its children), so a report
can be made at any time, also while the study runs or after a crash. Fits:
- loss against training compute C (FLOPs), a power law with an irreducible term,
  L(C) = E + A * C^(-b), per expert count and per alpha (groups with at least 4 trials);
- the best alpha per expert count: the vertex of a quadratic in alpha through the objective,
  with a bootstrap standard error (groups with at least 3 distinct alphas), else the best trial.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ercstudy.platform.report import figures
from ercstudy.platform.report.comparison import COST_METRICS, DEFAULT_METRICS, LEVEL, alpha_groups, point_rows
from ercstudy.platform.report.importance import importance_lines
from ercstudy.platform.report.scaling import scaling_section
from ercstudy.platform.study import leaderboard
from ercstudy.platform.study.optuna_store import DATABASE_ENV, OptunaStore, read_study
from ercstudy.platform.study.spec import Study, point_label
from ercstudy.platform.study.tables import markdown_table
from ercstudy.platform.tracking import client as tracking
from ercstudy.trainables.config import load_yaml


@dataclass(frozen=True)
class PowerLawFit:
    E: float  # irreducible loss
    A: float
    b: float  # exponent: L - E ~ C^-b
    E_err: float
    b_err: float
    n: int

    def __call__(self, c: np.ndarray) -> np.ndarray:
        return self.E + self.A * np.power(c, -self.b)


def fit_power_law(compute: Any, loss: Any) -> PowerLawFit:
    """Least squares fit of L = E + A * C^-b (in log-compute units for conditioning); needs >= 4 points."""
    from scipy.optimize import curve_fit

    c = np.asarray(compute, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    if len(c) < 4 or len(np.unique(c)) < 3:
        raise ValueError(f"a power law with an irreducible term needs >= 4 points at >= 3 compute values, got {len(c)}")
    c0 = float(np.exp(np.mean(np.log(c))))  # fit in C / C0: A stays O(1)

    def f(x: np.ndarray, E: float, logA: float, b: float) -> np.ndarray:
        return E + np.exp(logA) * np.power(x, -b)

    x = c / c0
    best = None
    for b0 in (0.1, 0.3, 0.6, 1.0):  # a few starts: the fit is not convex in b
        E0 = float(y.min()) * 0.9
        try:
            p, cov = curve_fit(f, x, y, p0=(E0, math.log(max(float(y.max() - E0), 1e-6)), b0), maxfev=20000)
        except RuntimeError:
            continue
        sse = float(np.sum((f(x, *p) - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, p, cov)
    if best is None:
        raise ValueError("the power-law fit did not converge")
    _, (E, logA, b), cov = best
    err = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else np.full(3, np.nan)
    return PowerLawFit(E=float(E), A=float(math.exp(logA) * c0**b), b=float(b), E_err=float(err[0]), b_err=float(err[2]), n=len(c))


def best_alpha(alpha: Any, objective: Any, *, mode: str = "min", boot: int = 200, seed: int = 0) -> tuple[float, float]:
    """(best alpha, standard error): vertex of a quadratic fit (bootstrap error), or the best point."""
    a = np.asarray(alpha, dtype=np.float64)
    y = np.asarray(objective, dtype=np.float64) * (1 if mode == "min" else -1)
    if len(np.unique(a)) < 3:
        i = int(np.argmin(y))
        return float(a[i]), float("nan")

    def vertex(aa: np.ndarray, yy: np.ndarray) -> float:
        if len(np.unique(aa)) < 3:
            return float(aa[np.argmin(yy)])
        c2, c1, _ = np.polyfit(aa, yy, 2)
        if c2 <= 0:  # no minimum inside: the best end
            return float(aa[np.argmin(yy)])
        return float(np.clip(-c1 / (2 * c2), aa.min(), aa.max()))

    rng = np.random.default_rng(seed)
    draws = [vertex(a[idx], y[idx]) for idx in (rng.integers(0, len(a), len(a)) for _ in range(boot))]
    return vertex(a, y), float(np.std(draws))


# ---------------------------------------------------------------------------------------------
# Trials from MLflow


def study_trials(study: Study, state: Any) -> list[dict[str, Any]]:
    """One dict per child run: trial id, status, the searched params (typed), final metrics, compute."""
    c = tracking.client(state.tracking_uri)
    runs = c.search_runs([state.experiment_id], filter_string=tracking.tag_filter(**{tracking.PARENT_TAG: state.parent_run_id}),
                         max_results=10000)
    out = []
    for run in runs:
        params = {k[len("search."):]: load_yaml(v) for k, v in run.data.params.items() if k.startswith("search.")}
        cfg = study.trial_config(params)
        m = run.data.metrics
        tokens = m.get("tokens", 0.0)
        tags = run.data.tags
        out.append({
            "trial": tags.get(tracking.TRIAL_TAG, run.info.run_id),
            "run_id": run.info.run_id,
            "status": tags.get(tracking.STATUS_TAG, "?"),
            # a point's seeds share ercstudy.point (search.repeats, search.arms); a plain study's trial is its own point
            "point": tags.get("ercstudy.point") or point_label(params),
            "arm": tags.get("ercstudy.arm", "search"),
            "seed": cfg.train.seed,
            "params": params,
            **params,
            **{o.metric: m.get(o.metric) for o in study.objectives},
            "step": m.get("step", m.get("tokens", 0) and None),
            "params_total": cfg.num_params(),
            "params_active": cfg.num_active_params(),
            "tokens": tokens,
            "compute": cfg.flops_per_token() * tokens,
            "num_experts": cfg.moe.num_experts,
            "top_k": cfg.moe.top_k,
            "alpha": cfg.erc.alpha if cfg.erc.enabled else None,  # no ERC, no alpha: never in an alpha fit
            **{k: m.get(k) for k in ("alpha_star", "eps_mean", "lb_loss", "load_max_over_mean")},  # the paper's figures
            **{k: m.get(k) for k in report_metrics(study)},
        })
    return out


def report_metrics(study: Study) -> list[str]:
    """What the report compares besides the objective: the study's report.metrics, else comparison.DEFAULT_METRICS."""
    names = study.report_metrics if study.report_metrics is not None else DEFAULT_METRICS
    return [m for m in names if m not in {o.metric for o in study.objectives}]


def metric_lines(study: Study, trials: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """The report's per-metric section, also as metrics.csv: for each metric, each point's mean and interval over its
    seeds and its paired difference to the baseline arm (cost metrics: the paired ratio), Holm-corrected per metric."""
    import csv

    cols = ["point", "arm", "seeds", "mean", "ci_low", "ci_high", "diff", "diff_low", "diff_high", "p_holm", "significant"]
    lines, every = [], []
    for metric in report_metrics(study):
        ratio = metric in COST_METRICS
        rows = point_rows(study, trials, metric, ratio=ratio)
        if not rows:
            continue  # no completed trial reports it (a router metric in an AoE-only study)
        every += [{"metric": metric, **r} for r in rows]
        shown = [{**r, "ratio" if ratio else "diff": r.get("diff"), "ratio_low" if ratio else "diff_low": r.get("diff_low"),
                  "ratio_high" if ratio else "diff_high": r.get("diff_high")} for r in rows]
        table_cols = [c.replace("diff", "ratio") if ratio else c for c in cols]
        lines += ["", f"### {metric}" + (" (ratio to the baseline arm)" if ratio else ""), "", *markdown_table(shown, table_cols)]
    if not every:
        return []
    with (out_dir / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["metric", *cols, "baseline", "pairs", "p"], extrasaction="ignore")
        w.writeheader()
        w.writerows(every)
    base = study.search.baseline_arm
    return ["", "## Points: the other metrics over seeds", "",
            f"As the objective's table, for each metric the study compares (report.metrics): `diff` the point minus the "
            f"`{base}` arm at equal seeds; for cost metrics `ratio`, the point over it (paired, tested against 1); Holm "
            f"over the points, per metric." if base else "As the objective's table, for each metric; no baseline arm.",
            *lines]


def point_lines(study: Study, trials: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """The report's per-point section (comparison.point_rows), also as points.csv: each point's mean and
    95% interval over its seeds, and its paired difference to the baseline arm at equal seeds."""
    import csv

    rows = point_rows(study, trials)
    cols = ["point", "arm", "seeds", "mean", "ci_low", "ci_high", "baseline", "pairs", "diff", "diff_low", "diff_high", "p",
            "p_holm", "significant", "confounded_by"]
    with (out_dir / "points.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    o, base = study.objective, study.search.baseline_arm
    lines = ["", f"## Points: {o.metric} over seeds", "",
             f"Mean and {LEVEL:.0%} Student-t interval over each point's completed seeds"
             + (f"; `diff` = the point minus the `{base}` arm at equal seeds and equal searched params the arm fixes, "
                f"with its {LEVEL:.0%} interval and paired t-test p-value; `significant` is Holm-corrected over the "
                f"points compared ({'lower' if o.mode == 'min' else 'higher'} is better)." if base else
                "; no baseline arm (search.arms) to pair with."), "", *markdown_table(rows, cols)]
    confounded = sorted({p for r in rows for p in (r.get("confounded_by") or "").split(", ") if p})
    if confounded:
        lines += ["", f"CONFOUNDED: the points with `confounded_by` differ from their baseline in {', '.join(confounded)}, "
                  "not only in ERC, so their `diff` mixes ERC with those params. For a comparison at equal params, give "
                  f"the arm those params as lists, crossed: e.g. `{confounded[0]}: [...]` under the arm, one baseline point "
                  "per value."]
    if rows and max(r["seeds"] for r in rows) < 2:
        lines += ["", "Every point ran at one seed: no interval, and no difference between points can be told from "
                  "seed noise (search.repeats)."]
    return lines


def write_report(study: Study, state: Any, out: str | None = None, *, storage: str, budget: float | None = None) -> str:
    """The report to `out` (default STORAGE/NAME/report; a path or a URI) and the parent run; returns where it went.
    budget: a compute budget in FLOPs at which the scaling fits predict the loss (scaling.py).

    It is made in a temporary directory, then copied to its place and logged to MLflow from there.
    """
    import tempfile

    from ercstudy.platform.cluster import storage as locations
    from ercstudy.platform.study.driver import study_path

    if budget is not None and not (math.isfinite(budget) and budget > 0):
        from ercstudy.platform.study.driver import StudyError

        raise StudyError(f"--budget {budget:g}: a compute budget is a positive number of FLOPs, e.g. 1e21")
    try:
        target = locations.resolve(out) if out else study_path(storage, study.name) / "report"
        locations.check(target)
    except locations.StorageError as err:
        from ercstudy.platform.study.driver import StudyError

        raise StudyError(str(err)) from None
    with tempfile.TemporaryDirectory(prefix="ercstudy-report-") as tmp:
        _write_report_files(study, state, Path(tmp), directory=str(study_path(storage, study.name)), budget=budget)
        target.upload(tmp)
        c = tracking.client(state.tracking_uri)
        for path in sorted(Path(tmp).iterdir()):
            c.log_artifact(state.parent_run_id, str(path), "report")
    return str(target)


def dashboard_line(directory: str, name: str) -> str:
    """How to open the study's Optuna store in optuna-dashboard (`pip install optuna-dashboard`)."""
    s = OptunaStore(directory)
    if s.in_database:
        return (f"The Optuna study: {s.where(name)}; `optuna-dashboard \"${DATABASE_ENV}\"` shows it live "
                "(`pip install optuna-dashboard`).")
    if s.remote:
        return (f"The Optuna study: `{s.location}`; copy it to this machine, then "
                "`optuna-dashboard sqlite:////ABSOLUTE/PATH/optuna.db` (`pip install optuna-dashboard`).")
    return f"The Optuna study: `optuna-dashboard {s.url}` (`pip install optuna-dashboard`)."


def _write_report_files(study: Study, state: Any, out_dir: Path, *, directory: str | None = None,
                        budget: float | None = None) -> None:
    trials = study_trials(study, state)
    o = study.objective
    done = [t for t in trials if t["status"] == "completed" and isinstance(t.get(o.metric), (int, float))]
    board = leaderboard.rank(study, list(trials))
    tagged = study.search.repeats > 1 or bool(study.search.arms)
    cols = ["trial", "status", *(["pareto"] if study.multi_objective else []), *(["point", "arm"] if tagged else []),
            *study.search.params, *(["train.seed"] if tagged else []), *(x.metric for x in study.objectives), "params_active", "compute"]
    lines = [f"# Study {study.name}", "", f"{len(trials)} trials, {len(done)} completed; objective {o.metric} ({o.mode}).", "",
             f"Order: {leaderboard.title(study)}.", "", *markdown_table(board, cols)]
    lines += point_lines(study, trials, out_dir)
    lines += metric_lines(study, trials, out_dir)
    importances: dict[str, Any] = {}
    if directory is not None:  # the study's Optuna store (optuna_store.py)
        with read_study(directory, study.name) as optuna_study:
            more, importances = importance_lines(study, optuna_study, where=OptunaStore(directory).where(study.name))
        lines += [*more, "", dashboard_line(directory, study.name)]
    import csv

    with (out_dir / "leaderboard.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(board)

    fits: dict[str, Any] = {"loss_vs_compute": {}, "best_alpha": {}, "importances": importances}
    for group_key, label in (("num_experts", "experts"), ("alpha", "alpha")):
        groups: dict[Any, list[dict]] = {}
        for t in done:
            if t["compute"] > 0 and t[group_key] is not None:  # trials without ERC have no alpha
                groups.setdefault(t[group_key], []).append(t)
        for value, ts in sorted(groups.items()):
            name = f"{label}={value:g}"
            try:
                fit = fit_power_law([t["compute"] for t in ts], [t[o.metric] for t in ts])
            except ValueError as err:
                fits["loss_vs_compute"][name] = {"skipped": str(err), "n": len(ts)}
                continue
            fits["loss_vs_compute"][name] = asdict(fit)
    for group in alpha_groups(study, done):  # ERC-on trials only, at equal other params where the study has them
        ts = group.trials
        a, err = best_alpha([t["alpha"] for t in ts], [t[o.metric] for t in ts], mode=o.mode)
        fits["best_alpha"][group.label] = {"alpha": a, "stderr": err, "n": len(ts), "confounded_by": group.confounded}
    lines += ["", "## Scaling fits: L(C) = E + A C^-b", ""]
    skipped: dict[str, list[str]] = {}  # one line per reason: a sampled float alpha makes a group per trial's point
    for name, f in fits["loss_vs_compute"].items():
        if "skipped" in f:
            skipped.setdefault(f["skipped"], []).append(name)
            continue
        at = f" ; at C = {budget:.3g} FLOPs: {f['E'] + f['A'] * budget ** -f['b']:.4g}" if budget else ""
        lines.append(f"- {name}: b = {f['b']:.3f} ± {f['b_err']:.3f}, E = {f['E']:.3f} ± {f['E_err']:.3f} ({f['n']} trials){at}")
    lines += [f"- {', '.join(names)}: skipped ({why})" for why, names in skipped.items()]
    if o.mode == "min":
        more, fits["scaling"] = scaling_section(done, o.metric, budget=budget, seed=study.search.seed)
        lines += more
    else:
        lines += ["", "## Scaling laws across trials", "", f"Not fitted: the objective {o.metric} is maximized, not a loss."]
    lines += ["", "## Best alpha per expert count", "", "ERC-on trials only (a trial without ERC has no alpha), "
              "grouped by the other searched params where every group has 3 alphas.", ""]
    for name, f in fits["best_alpha"].items():
        lines.append(f"- {name}: alpha = {f['alpha']:.3g}" + (f" ± {f['stderr']:.2g}" if math.isfinite(f["stderr"]) else " (best trial; too few alphas for a fit)") + f" ({f['n']} trials)"
                     + (f"; CONFOUNDED: {', '.join(f['confounded_by'])} differ between these trials, so this is not alpha "
                        "at equal other params" if f["confounded_by"] else ""))
    (out_dir / "fits.json").write_text(json.dumps(fits, indent=2))
    drawn = figures.draw_all(study, trials, fits["loss_vs_compute"], tracking.client(state.tracking_uri), out_dir)
    lines += ["", "## Figures", "", "Also on the study's MLflow parent run (artifacts, report/).", ""]
    lines += [f"![{name}]({name})" for name in drawn] or ["No trial has reported yet: no figures."]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")

