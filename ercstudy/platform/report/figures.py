"""The report's figures (PNGs in the report directory, logged on the study's parent run by report.py).

- objective_vs_params.png: the objective against each searched param; log axes for log-scaled params,
  categorical params as categories, colour = a second param, stopped and failed trials marked.
- loss_vs_compute.png: the objective against training compute with the power-law fits.
- The paper's figures, from any study: eps_over_training.png (the noise bound over training, one line per
  trial, coloured by alpha), alpha_star_vs_alpha.png (the coupling alpha* at the end against the alpha
  trained with), coupling_matrices.png (each point's final M side by side, last MoE layer), and
  load_balance.png (the final load-balancing loss and max/mean expert load per arm).
A figure the study has no data for is not drawn; `draw_all` returns the names of those it wrote.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ercstudy.platform.study.spec import Study

MARKERS = {"completed": ("o", "completed"), "stopped_early": ("v", "stopped early"),
           "stopped_nonfinite": ("X", "stopped: non-finite loss"), "failed": ("x", "failed (no value)")}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def unit(metric: str) -> str:
    """An axis label with its unit."""
    if metric.endswith("loss"):
        return f"{metric} (nats/token)"
    if metric == "compute":
        return "training compute (FLOPs)"
    if metric == "tokens_per_s":
        return "throughput (tokens/s)"
    return metric


def _value(t: dict[str, Any], key: str) -> float | None:
    v = t.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _colour_param(study: Study, p: str) -> str | None:
    """The param that colours the panel of `p`: the next searched param, else the expert count."""
    others = [q for q in study.search.params if q != p]
    return others[0] if others else None


def objective_vs_params(study: Study, trials: list[dict[str, Any]], out: Path) -> str | None:
    plt = _plt()
    o = study.objective
    params = list(study.search.params)
    if not params or not trials:
        return None
    finite = [v for t in trials if (v := _value(t, o.metric)) is not None]
    top = max(finite) if finite else 1.0
    fig, axes = plt.subplots(1, len(params), figsize=(4.6 * len(params), 3.8), squeeze=False)
    for ax, p in zip(axes[0], params):
        spec = study.search.params[p]
        have = [t for t in trials if p in t and t[p] is not None]
        categorical = spec.type == "categorical"
        order = [str(c) for c in spec.choices] if categorical else []
        colour = _colour_param(study, p)
        cvalues = [t.get(colour) if colour else t.get("num_experts") for t in have]
        cname = colour or "num_experts"
        numeric_colour = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in cvalues if c is not None)
        if numeric_colour and cvalues and any(c is not None for c in cvalues):
            cs = [float(c) if c is not None else np.nan for c in cvalues]
            lo, hi = np.nanmin(cs), np.nanmax(cs)
            log_c = bool(colour and study.search.params[colour].log)
            norm = plt.matplotlib.colors.LogNorm(lo, hi) if log_c and lo > 0 and hi > lo else plt.Normalize(lo, hi if hi > lo else lo + 1)
            cmap = plt.get_cmap("viridis")
            colours = [cmap(norm(c)) if c == c else "grey" for c in cs]
            fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=cname)
        else:
            keys = list(dict.fromkeys(str(c) for c in cvalues))
            palette = plt.get_cmap("tab10")
            colours = [palette(keys.index(str(c)) % 10) for c in cvalues]
            for i, key in enumerate(keys):
                ax.scatter([], [], color=palette(i % 10), label=f"{cname}={key}")
        for status, (marker, label) in MARKERS.items():
            idx = [i for i, t in enumerate(have) if t["status"] == status]
            if not idx:
                continue
            xs = [order.index(str(have[i][p])) if categorical else have[i][p] for i in idx]
            ys = [_value(have[i], o.metric) for i in idx]
            ys = [top if y is None else y for y in ys]  # a failed trial has no value: drawn at the top, marked
            cols = [colours[i] for i in idx]
            if marker in ("x", "X"):
                ax.scatter(xs, ys, marker=marker, c="red" if status == "failed" else cols, s=50, label=label)
            elif status == "completed":
                ax.scatter(xs, ys, marker=marker, c=cols, s=36, edgecolors="k", linewidths=0.4, label=label)
            else:
                ax.scatter(xs, ys, marker=marker, facecolors="none", edgecolors=cols, s=50, label=label)
        if categorical:
            ax.set_xticks(range(len(order)), order)
            ax.set_xlim(-0.5, len(order) - 0.5)
        elif spec.log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
        ax.set_xlabel(p + (" (log scale)" if spec.log else ""))
        ax.set_ylabel(unit(o.metric))
        ax.set_title(f"{o.metric} against {p}")
        ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"Study {study.name}: objective against each searched param ({len(trials)} trials)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, "objective_vs_params.png")


def loss_vs_compute(study: Study, trials: list[dict[str, Any]], fits: dict[str, Any], out: Path) -> str | None:
    plt = _plt()
    o = study.objective
    done = [t for t in trials if t["status"] == "completed" and _value(t, o.metric) is not None and t["compute"] > 0]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.4))
    cs = np.geomspace(min(t["compute"] for t in done), max(t["compute"] for t in done), 50)
    for name, f in fits.items():
        if "skipped" not in f and name.startswith("experts="):
            ax.plot(cs, f["E"] + f["A"] * cs ** -f["b"], label=f"{name}: b={f['b']:.2f}")
    experts = sorted({t["num_experts"] for t in done})
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(experts):
        ts = [t for t in done if t["num_experts"] == n]
        ax.scatter([t["compute"] for t in ts], [t[o.metric] for t in ts], s=16, color=cmap(i / max(len(experts) - 1, 1)),
                   label=f"trials, {n} experts")
    ax.set_xscale("log")
    ax.set_xlabel(unit("compute") + ", log scale")
    ax.set_ylabel(unit(o.metric))
    ax.set_title(f"{o.metric} against training compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "loss_vs_compute.png")


def _alpha_label(t: dict[str, Any]) -> str:
    return "no ERC" if t.get("alpha") is None else f"alpha={t['alpha']:g}"


def eps_over_training(study: Study, trials: list[dict[str, Any]], client: Any, out: Path) -> str | None:
    """The paper's specialization-tracking figure: eps (mean over layers and experts) over training per alpha."""
    from ercstudy.platform.tracking.client import metric_curves

    plt = _plt()
    curves = [(t, c["eps_mean"]) for t in trials if (c := metric_curves(client, t["run_id"], ["eps_mean"])).get("eps_mean")]
    if not curves:
        return None
    alphas = sorted({t["alpha"] for t, _ in curves if t.get("alpha") is not None})
    cmap = plt.get_cmap("plasma")
    fig, ax = plt.subplots(figsize=(6, 4.4))
    seen = set()
    for t, (steps, values) in curves:
        label = _alpha_label(t)
        if t.get("alpha") is None:
            style = {"color": "grey", "linestyle": "--"}
        else:
            style = {"color": cmap(0.85 * alphas.index(t["alpha"]) / max(len(alphas) - 1, 1))}
        ax.plot(steps, values, label=None if label in seen else label, linewidth=1.2, **style,
                marker=None if t["status"] == "completed" else "x", markevery=[len(steps) - 1])
        seen.add(label)
    ax.set_xlabel("training step")
    ax.set_ylabel("noise bound eps (mean over layers, experts)")
    ax.set_title("eps over training per alpha (x: stopped or failed trial)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "eps_over_training.png")


def alpha_star_vs_alpha(study: Study, trials: list[dict[str, Any]], out: Path) -> str | None:
    plt = _plt()
    have = [t for t in trials if _value(t, "alpha_star") is not None]
    erc = [t for t in have if t.get("alpha") is not None]
    if not erc:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    experts = sorted({t["num_experts"] for t in have})
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(experts):
        col = cmap(i / max(len(experts) - 1, 1))
        ts = [t for t in erc if t["num_experts"] == n]
        for status, (marker, label) in MARKERS.items():
            s = [t for t in ts if t["status"] == status]
            if s:
                ax.scatter([t["alpha"] for t in s], [t["alpha_star"] for t in s], marker=marker, color=col,
                           label=f"{n} experts" + ("" if status == "completed" else f", {label}"))
        base = [t["alpha_star"] for t in have if t.get("alpha") is None and t["num_experts"] == n]
        if base:
            ax.axhline(float(np.mean(base)), color=col, linestyle="--", label=f"no ERC, {n} experts (mean of {len(base)})")
    lim = [min(t["alpha"] for t in erc), max(t["alpha"] for t in erc)]
    ax.plot(lim, lim, color="k", linewidth=0.6, label="alpha* = alpha")
    ax.set_xlabel("alpha trained with")
    ax.set_ylabel("alpha* at the end (smallest alpha with zero ERC loss)")
    ax.set_title("Coupling alpha* against alpha")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, out, "alpha_star_vs_alpha.png")


def coupling_matrices(study: Study, trials: list[dict[str, Any]], client: Any, out: Path, *, most: int = 8) -> str | None:
    """Each point's final M (its first completed seed, last MoE layer) side by side."""
    plt = _plt()
    shown: dict[str, tuple[dict[str, Any], list]] = {}
    for t in sorted(trials, key=lambda t: (t.get("alpha") is not None, t.get("alpha") or 0, str(t["point"]), t["seed"])):
        if t["status"] != "completed" or t["point"] in shown or len(shown) >= most:
            continue
        m = _coupling_matrix(client, t["run_id"])
        if m:
            shown[t["point"]] = (t, m)
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(3.4 * len(shown), 3.4), squeeze=False)
    for ax, (t, m) in zip(axes[0], shown.values()):
        im = ax.imshow(np.asarray(m[-1]), cmap="viridis")
        ax.set_title(f"{_alpha_label(t)}, {t['num_experts']} experts\n{t['point']}"[:60], fontsize=7)
        ax.set_xlabel("expert j (gate)")
        ax.set_ylabel("proxy i (router row)")
        fig.colorbar(im, ax=ax, fraction=0.046, label="||R~[i] W_g^j||")
    fig.suptitle("Final coupling matrices M (last MoE layer)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, "coupling_matrices.png")


def _coupling_matrix(client: Any, run_id: str) -> list | None:
    with tempfile.TemporaryDirectory(prefix="ercstudy-m-") as tmp:
        try:
            path = client.download_artifacts(run_id, "coupling_matrices.json", tmp)
        except Exception:  # a trial that ended before its last step logged no M
            return None
        return json.loads(Path(path).read_text())


def load_balance(study: Study, trials: list[dict[str, Any]], out: Path) -> str | None:
    """The final load-balancing loss and max/mean expert load, per arm (the paper: ERC leaves them unchanged)."""
    plt = _plt()
    keys = [("lb_loss", "load-balancing loss"), ("load_max_over_mean", "max / mean expert load")]
    done = [t for t in trials if t["status"] == "completed"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in done:
        label = t["arm"] if t["arm"] != "search" else ("ERC" if t.get("alpha") is not None else "no ERC")
        groups.setdefault(f"{label}\n{t['num_experts']} experts", []).append(t)
    keys = [(k, title) for k, title in keys if any(_value(t, k) is not None for t in done)]
    if not groups or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    rng = np.random.default_rng(0)  # the strip's horizontal jitter
    for ax, (key, title) in zip(axes[0], keys):
        names = sorted(groups)
        for i, name in enumerate(names):
            ys = [v for t in groups[name] if (v := _value(t, key)) is not None]
            if not ys:
                continue
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(ys)), ys, s=18, color="tab:blue")
            ax.errorbar(i + 0.25, float(np.mean(ys)), yerr=float(np.std(ys)) if len(ys) > 1 else 0, fmt="_", color="k", capsize=4)
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_ylabel(title)
        ax.set_title(f"{title} at the end, per arm (mean ± sd)")
    fig.tight_layout()
    return _save(fig, out, "load_balance.png")


def _save(fig: Any, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=110)
    _plt().close(fig)
    return name


def draw_all(study: Study, trials: list[dict[str, Any]], fits: dict[str, Any], client: Any, out: Path) -> list[str]:
    drawn = [objective_vs_params(study, trials, out), loss_vs_compute(study, trials, fits, out),
             eps_over_training(study, trials, client, out), alpha_star_vs_alpha(study, trials, out),
             coupling_matrices(study, trials, client, out), load_balance(study, trials, out)]
    return [d for d in drawn if d]
