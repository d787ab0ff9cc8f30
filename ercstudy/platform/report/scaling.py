"""Scaling laws across a study's trials, the forms the MoE literature fits, with bootstrap intervals.

- Chinchilla (Hoffmann et al. 2022): L(N, D) = E + A / N^a + B / D^b, N = active parameters, D = training
  tokens. Fitted as they do: least squares on log L (robust to the loss scale), from several starts.
  At a compute budget C = k N D (k: the study's FLOPs per active parameter per token, from its configs) the
  compute-optimal split is N_opt = G (C/k)^(b/(a+b)), G = (aA / (bB))^(1/(a+b)), D_opt = C / (k N_opt).
- Routed (Clark et al. 2022, unified scaling laws for routed language models):
  log L = a log N + b log E + c log N log E + d, N = active parameters, E = expert count, at a fixed number
  of training tokens (as they fit it): trials at the study's most common token count only.

Every parameter comes with a percentile bootstrap 95% interval (trials resampled with replacement, from a
seeded generator; a draw that cannot identify the fit is skipped and counted). Data that cannot identify a
form (too few trials, distinct N, D or E; N and D moving together) is refused with one line (`Unidentified`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LEVEL = 0.95
BOOT = 200


class Unidentified(ValueError):
    """The data cannot identify this form; the message says why in one line."""


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


@dataclass(frozen=True)
class Fit:
    form: str  # "chinchilla" | "routed"
    params: dict[str, Estimate]
    n: int  # trials fitted
    rmse: float  # of log L
    draws: int  # bootstrap draws that identified the fit
    note: str = ""
    boot: list[dict[str, float]] = field(default_factory=list, repr=False)  # the draws' point estimates

    def value(self, name: str) -> float:
        return self.params[name].value


def _interval(samples: list[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return math.nan, math.nan
    lo, hi = np.percentile(samples, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return float(lo), float(hi)


def _bootstrap(fit_once: Any, columns: tuple[np.ndarray, ...], point: dict[str, float], *, boot: int, seed: int) -> tuple[dict[str, Estimate], int, list[dict[str, float]]]:
    rng = np.random.default_rng(seed)
    n = len(columns[0])
    draws: list[dict[str, float]] = []
    for _ in range(boot):
        idx = rng.integers(0, n, n)
        try:
            draws.append(fit_once(*(c[idx] for c in columns)))
        except (Unidentified, RuntimeError, ValueError, np.linalg.LinAlgError):
            continue
    est = {k: Estimate(v, *_interval([d[k] for d in draws])) for k, v in point.items()}
    return est, len(draws), draws


# ---------------------------------------------------------------------------------------------
# Chinchilla: L(N, D) = E + A / N^a + B / D^b


def _check_chinchilla(N: np.ndarray, D: np.ndarray) -> None:
    if len(N) < 6:
        raise Unidentified(f"L(N, D) = E + A/N^a + B/D^b has 5 parameters: needs >= 6 trials, got {len(N)}")
    for name, x in (("N (active params)", N), ("D (tokens)", D)):
        if len(np.unique(x)) < 3:
            raise Unidentified(f"L(N, D) needs >= 3 distinct {name}, got {len(np.unique(x))}")
    r = np.corrcoef(np.log(N), np.log(D))[0, 1]
    if abs(r) > 0.98:
        raise Unidentified(f"N and D move together (log-correlation {r:.3f}): their terms cannot be told apart; "
                           "vary the token budget at fixed model size")


# bounds of the fit's internal vector (log E, log A', a, log B', b)
_LOW, _HIGH = np.array([-20, -30, 0.0, -30, 0.0]), np.array([10, 30, 4.0, 30, 4.0])


def _geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


def _chinchilla_starts(L: np.ndarray) -> list[np.ndarray]:
    """The grid of starts of a fit from nothing: exponents 0.2, 0.5, 1 each, E at half the smallest loss."""
    floor, scale = math.log(max(float(L.min()) * 0.5, 1e-6)), math.log(float(L.mean()) * 0.3)
    return [np.array([floor, scale, a0, scale, b0]) for a0 in (0.2, 0.5, 1.0) for b0 in (0.2, 0.5, 1.0)]


def _fit_chinchilla(N: np.ndarray, D: np.ndarray, L: np.ndarray, starts: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Least squares on log L in (log E, log A', a, log B', b) with N, D scaled by their geometric means, from each
    of `starts` (default: the grid); the best fit's parameters, its rmse and its internal vector `_x`."""
    from scipy.optimize import least_squares

    _check_chinchilla(N, D)
    n0, d0 = _geomean(N), _geomean(D)
    x, y, logL = N / n0, D / d0, np.log(L)
    lx, ly = np.log(x), np.log(y)

    def terms(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        e, la, a, lb, b = p
        return np.full_like(lx, math.exp(e)), np.exp(la - a * lx), np.exp(lb - b * ly)

    def resid(p: np.ndarray) -> np.ndarray:
        return np.log(sum(terms(p))) - logL

    def jac(p: np.ndarray) -> np.ndarray:  # d log S / dp, S = E + A' x^-a + B' y^-b: exact, no finite differences
        te, ta, tb = terms(p)
        return np.stack([te, ta, -ta * lx, tb, -tb * ly], axis=1) / (te + ta + tb)[:, None]

    best = None
    for p0 in starts if starts is not None else _chinchilla_starts(L):
        r = least_squares(resid, p0, jac=jac, bounds=(_LOW, _HIGH), method="trf")
        if best is None or r.cost < best.cost:
            best = r
    e, la, a, lb, b = best.x
    return {"E": float(math.exp(e)), "A": float(math.exp(la) * n0**a), "a": float(a), "B": float(math.exp(lb) * d0**b),
            "b": float(b), "_rmse": float(math.sqrt(2 * best.cost / len(L))), "_x": best.x}


def fit_chinchilla(N: Any, D: Any, loss: Any, *, boot: int = BOOT, seed: int = 0) -> Fit:
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, loss))
    point = _fit_chinchilla(N, D, L)
    rmse, x = point.pop("_rmse"), point.pop("_x")
    # each draw starts from the full sample's fit and from the grid's middle start, not from the whole grid: the
    # draws are near the full sample, and nine starts per draw made a report's 200 draws take half a minute.
    # (N and D are rescaled per draw, by the draw's geometric means: the start is shifted to those scales.)
    n0, d0 = _geomean(N), _geomean(D)

    def refit(n: np.ndarray, d: np.ndarray, l_: np.ndarray) -> dict[str, Any]:
        dn, dd = math.log(_geomean(n) / n0), math.log(_geomean(d) / d0)
        warm = np.clip(x + np.array([0.0, -x[2] * dn, 0.0, -x[4] * dd, 0.0]), _LOW, _HIGH)
        out = _fit_chinchilla(n, d, l_, starts=[warm, _chinchilla_starts(l_)[4]])
        out.pop("_x")
        return out

    est, draws, samples = _bootstrap(refit, (N, D, L), point, boot=boot, seed=seed)
    return Fit("chinchilla", est, len(L), rmse, draws, boot=samples)


def chinchilla_loss(p: dict[str, float], N: Any, D: Any) -> Any:
    return p["E"] + p["A"] / np.power(N, p["a"]) + p["B"] / np.power(D, p["b"])


def compute_optimal(p: dict[str, float], budget: float, k: float) -> tuple[float, float, float]:
    """(N_opt, D_opt, L) minimizing L(N, D) subject to k N D = budget FLOPs."""
    a, b = p["a"], p["b"]
    if a <= 0 or b <= 0:
        raise Unidentified("an exponent is 0: no compute-optimal split")
    nd = budget / k
    G = (a * p["A"] / (b * p["B"])) ** (1 / (a + b))
    n_opt = G * nd ** (b / (a + b))
    d_opt = nd / n_opt
    return float(n_opt), float(d_opt), float(chinchilla_loss(p, n_opt, d_opt))


# ---------------------------------------------------------------------------------------------
# Routed (Clark et al.): log L = a log N + b log E + c log N log E + d


def _design(N: np.ndarray, E: np.ndarray) -> np.ndarray:
    ln, le = np.log(N), np.log(E)
    return np.stack([ln, le, ln * le, np.ones_like(ln)], axis=1)


def _fit_routed(N: np.ndarray, E: np.ndarray, L: np.ndarray) -> dict[str, float]:
    if len(N) < 5:
        raise Unidentified(f"log L = a log N + b log E + c log N log E + d has 4 parameters: needs >= 5 trials, got {len(N)}")
    for name, x in (("N (active params)", N), ("expert counts E", E)):
        if len(np.unique(x)) < 2:
            raise Unidentified(f"the routed form needs >= 2 distinct {name}, got {len(np.unique(x))}")
    X = _design(N, E)
    if np.linalg.matrix_rank(X) < 4 or np.linalg.cond(X) > 1e12:
        raise Unidentified("N and E do not vary independently (e.g. each N at one E): the interaction term cannot be fitted")
    coef, *_ = np.linalg.lstsq(X, np.log(L), rcond=None)
    rmse = float(np.sqrt(np.mean((X @ coef - np.log(L)) ** 2)))
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]), "d": float(coef[3]), "_rmse": rmse}


def fit_routed(N: Any, E: Any, loss: Any, *, boot: int = BOOT, seed: int = 0, note: str = "") -> Fit:
    N, E, L = (np.asarray(v, dtype=np.float64) for v in (N, E, loss))
    point = _fit_routed(N, E, L)
    rmse = point.pop("_rmse")
    est, draws, samples = _bootstrap(lambda *c: _fit_routed(*c), (N, E, L), point, boot=boot, seed=seed)
    return Fit("routed", est, len(L), rmse, draws, note=note, boot=samples)


def routed_loss(p: dict[str, float], N: Any, E: Any) -> Any:
    ln, le = np.log(N), np.log(E)
    return np.exp(p["a"] * ln + p["b"] * le + p["c"] * ln * le + p["d"])


# ---------------------------------------------------------------------------------------------
# From a study's trials to the report


def flops_per_param_token(trials: list[dict[str, Any]]) -> float:
    """k in C = k N D: the study's training FLOPs per active parameter per token (about 6, plus attention)."""
    ks = [t["compute"] / (t["params_active"] * t["tokens"]) for t in trials if t.get("tokens") and t.get("params_active")]
    return float(np.median(ks)) if ks else 6.0


def _band(draws: list[dict[str, float]], f: Any) -> tuple[float, float]:
    values = []
    for d in draws:
        try:
            v = f(d)
        except (Unidentified, ValueError, ZeroDivisionError, OverflowError):
            continue
        if np.all(np.isfinite(v)):
            values.append(v)
    return _interval(values)


def scaling_section(trials: list[dict[str, Any]], metric: str, *, budget: float | None = None, seed: int = 0) -> tuple[list[str], dict[str, Any]]:
    """The report's lines and fits.json entries for the Chinchilla and routed forms over completed `trials`
    (each with params_active, tokens, num_experts, compute and the `metric`, a loss: lower is better, > 0)."""
    ts = [t for t in trials if t.get("tokens") and t.get("params_active") and isinstance(t.get(metric), (int, float))
          and t[metric] > 0]
    lines = ["", "## Scaling laws across trials", "",
             f"{metric} over all completed trials (every arm and alpha pooled); N = active parameters, D = training tokens, "
             f"E = experts; "
             f"[{LEVEL:.0%} bootstrap interval, {BOOT} draws, seed {seed}]."]
    out: dict[str, Any] = {}
    k = flops_per_param_token(ts)
    N = np.array([t["params_active"] for t in ts], dtype=np.float64)
    D = np.array([t["tokens"] for t in ts], dtype=np.float64)
    L = np.array([t[metric] for t in ts], dtype=np.float64)
    biggest = max((t["compute"] for t in ts), default=0.0)

    lines += ["", "Chinchilla: L(N, D) = E + A / N^a + B / D^b"]
    try:
        fit = fit_chinchilla(N, D, L, seed=seed)
    except Unidentified as err:
        lines.append(f"- not fitted: {err}")
        out["chinchilla"] = {"skipped": str(err), "n": len(ts)}
    else:
        lines += [f"- {name} = {est}" for name, est in fit.params.items()]
        lines.append(f"- {fit.n} trials, rmse of log L {fit.rmse:.3g}, {fit.draws}/{BOOT} bootstrap draws identified")
        out["chinchilla"] = _as_json(fit)
        if budget:
            p = {k_: e.value for k_, e in fit.params.items()}
            n_opt, d_opt, loss = compute_optimal(p, budget, k)
            lo, hi = _band(fit.boot, lambda d: compute_optimal(d, budget, k)[2])
            nlo, nhi = _band(fit.boot, lambda d: compute_optimal(d, budget, k)[0])
            lines.append(f"- at C = {budget:.3g} FLOPs (C = {k:.3g} N D): compute-optimal N = {n_opt:.3g} [{nlo:.3g}, {nhi:.3g}] "
                         f"active params, D = {d_opt:.3g} tokens, predicted {metric} = {loss:.4g} [{lo:.4g}, {hi:.4g}]"
                         + _extrapolation(budget, biggest))
            out["chinchilla"]["budget"] = {"C": budget, "k": k, "N_opt": n_opt, "D_opt": d_opt, "loss": loss, "loss_ci": [lo, hi],
                                           "N_opt_ci": [nlo, nhi]}

    lines += ["", "Routed (Clark et al. 2022): log L = a log N + b log E + c log N log E + d, at fixed D"]
    counts = Counter(D.tolist())
    d_fixed = max(counts, key=lambda d: (counts[d], d)) if counts else 0.0
    at = np.array([d == d_fixed for d in D.tolist()], dtype=bool)
    E = np.array([t["num_experts"] for t in ts], dtype=np.float64)
    note = f"the {int(at.sum())} trials at D = {d_fixed:.3g} tokens" + (f" (of {len(ts)}: D varies)" if len(counts) > 1 else "")
    try:
        fit = fit_routed(N[at], E[at], L[at], seed=seed, note=note)
    except Unidentified as err:
        lines.append(f"- not fitted: {err}")
        out["routed"] = {"skipped": str(err), "n": int(at.sum())}
    else:
        lines += [f"- {name} = {est}" for name, est in fit.params.items()]
        lines.append(f"- {note}, rmse of log L {fit.rmse:.3g}, {fit.draws}/{BOOT} bootstrap draws identified")
        out["routed"] = {**_as_json(fit), "D": d_fixed}
        if budget:
            n_at = budget / (k * d_fixed)
            preds = {}
            for e in sorted(set(E[at].tolist())):
                v = float(routed_loss({k_: x.value for k_, x in fit.params.items()}, n_at, e))
                preds[e] = (v, *_band(fit.boot, lambda d, e=e: float(routed_loss(d, n_at, e))))
            lines.append(f"- at C = {budget:.3g} FLOPs and D = {d_fixed:.3g}: N = {n_at:.3g} active params; predicted {metric} "
                         + ", ".join(f"E={e:g}: {v:.4g} [{lo:.4g}, {hi:.4g}]" for e, (v, lo, hi) in preds.items())
                         + _extrapolation(budget, biggest))
            out["routed"]["budget"] = {"C": budget, "N": n_at, "loss": {str(e): list(v) for e, v in preds.items()}}
    return lines, out


def _extrapolation(budget: float, biggest: float) -> str:
    if biggest > 0 and budget > biggest:
        return f" (extrapolated {budget / biggest:.3g}x beyond the largest trial's compute)"
    return ""


def _as_json(fit: Fit) -> dict[str, Any]:
    return {"params": {k: [e.value, e.low, e.high] for k, e in fit.params.items()}, "n": fit.n, "rmse_log": fit.rmse,
            "draws": fit.draws, **({"note": fit.note} if fit.note else {})}
