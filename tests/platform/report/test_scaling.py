"""Scaling laws across trials (platform/report/scaling.py): the Chinchilla and the routed (Clark et al.) forms recover
the parameters that generated synthetic losses within their bootstrap intervals, the compute-optimal split
is the constrained minimum, and data that cannot identify a form is refused in one line."""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from ercstudy.platform.report.scaling import (
    Unidentified,
    chinchilla_loss,
    compute_optimal,
    fit_chinchilla,
    fit_routed,
    routed_loss,
    scaling_section,
)

CHINCHILLA = {"E": 1.7, "A": 400.0, "a": 0.34, "B": 410.0, "b": 0.28}
ROUTED = {"a": -0.08, "b": -0.03, "c": 0.003, "d": 2.2}


def chinchilla_data(seed=0, noise=0.003):
    N, D = (x.ravel() for x in np.meshgrid(np.geomspace(1e6, 1e8, 5), np.geomspace(1e8, 1e10, 4)))
    rng = np.random.default_rng(seed)
    return N, D, chinchilla_loss(CHINCHILLA, N, D) * np.exp(rng.normal(0, noise, len(N)))


def test_chinchilla_recovers_known_parameters_within_their_intervals():
    N, D, L = chinchilla_data()
    fit = fit_chinchilla(N, D, L, seed=0)
    for name, true in CHINCHILLA.items():
        est = fit.params[name]
        assert est.low <= true <= est.high, (name, est)
        assert est.low < est.value < est.high
    assert fit.draws >= 190 and fit.rmse < 0.01
    assert fit_chinchilla(N, D, L, seed=0).params == fit.params  # seeded


def test_the_compute_optimal_split_is_the_constrained_minimum():
    budget, k = 1e21, 6.0
    n_opt, d_opt, loss = compute_optimal(CHINCHILLA, budget, k)
    assert k * n_opt * d_opt == pytest.approx(budget)
    best = minimize_scalar(lambda logn: chinchilla_loss(CHINCHILLA, np.exp(logn), budget / (k * np.exp(logn))),
                           bounds=(np.log(1e6), np.log(1e14)), method="bounded", options={"xatol": 1e-10})
    assert np.log(n_opt) == pytest.approx(best.x, abs=1e-3) and loss == pytest.approx(best.fun, rel=1e-9)


def test_routed_form_recovers_known_parameters_within_their_intervals():
    N, E = (x.ravel() for x in np.meshgrid(np.geomspace(1e6, 1e8, 4), [4, 8, 16, 32]))
    L = routed_loss(ROUTED, N, E) * np.exp(np.random.default_rng(1).normal(0, 0.003, len(N)))
    fit = fit_routed(N, E, L, seed=0)
    for name, true in ROUTED.items():
        assert fit.params[name].low <= true <= fit.params[name].high, (name, fit.params[name])


@pytest.mark.parametrize("case, match", [
    ("one N", r"needs >= 3 distinct N \(active params\), got 1"),
    ("two D", r"needs >= 3 distinct D \(tokens\), got 2"),
    ("N with D", r"N and D move together"),
    ("five trials", r"needs >= 6 trials, got 5"),
])
def test_chinchilla_refuses_data_that_cannot_identify_it(case, match):
    N, D, L = chinchilla_data()
    if case == "one N":
        N = np.full_like(N, 1e7)
    elif case == "two D":
        D = np.where(D > 1e9, 1e10, 1e8)
    elif case == "N with D":
        N, D = np.geomspace(1e6, 1e8, 8), 20 * np.geomspace(1e6, 1e8, 8)  # every model at 20 tokens per param
        L = chinchilla_loss(CHINCHILLA, N, D)
    else:
        N, D, L = N[:5], D[:5], L[:5]
    with pytest.raises(Unidentified, match=match) as err:
        fit_chinchilla(N, D, L)
    assert "\n" not in str(err.value)


def test_routed_form_refuses_one_expert_count_and_confounded_n_and_e():
    N = np.geomspace(1e6, 1e8, 6)
    with pytest.raises(Unidentified, match="distinct expert counts E, got 1"):
        fit_routed(N, np.full(6, 8.0), np.linspace(3, 2, 6))
    with pytest.raises(Unidentified, match="do not vary independently"):
        fit_routed(np.repeat([1e6, 1e7, 1e8], 2), np.repeat([4.0, 8.0, 16.0], 2), np.linspace(3, 2, 6))


def test_the_report_section_predicts_at_a_budget_or_says_why_not():
    N, D, L = chinchilla_data()
    trials = [{"params_active": n, "tokens": d, "num_experts": 8, "compute": 6.2 * n * d, "eval/loss": v}
              for n, d, v in zip(N, D, L)]
    lines, fits = scaling_section(trials, "eval/loss", budget=1e21)
    text = "\n".join(lines)
    assert "compute-optimal N = " in text and "extrapolated" in text and fits["chinchilla"]["budget"]["k"] == pytest.approx(6.2)
    low, high = fits["chinchilla"]["budget"]["loss_ci"]
    true = compute_optimal(CHINCHILLA, 1e21, 6.2)[2]
    assert low <= true <= high
    assert fits["routed"]["skipped"].startswith("the routed form needs >= 2 distinct expert counts E")
    lines, fits = scaling_section(trials[:3], "eval/loss", budget=1e21)
    assert [line for line in lines if line.startswith("- not fitted")] == [
        "- not fitted: L(N, D) = E + A/N^a + B/D^b has 5 parameters: needs >= 6 trials, got 3",
        "- not fitted: log L = a log N + b log E + c log N log E + d has 4 parameters: needs >= 5 trials, got 3"]
