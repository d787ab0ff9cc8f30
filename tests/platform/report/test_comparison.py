"""The report's comparisons (platform/report/comparison.py) against scipy: t intervals, paired t-tests at equal
seeds, Holm's correction; best-alpha groups hold ERC-on trials only and say when they are confounded."""

import math

import numpy as np
import pytest
import yaml
from scipy import stats

from ercstudy.platform.report.comparison import alpha_groups, holm, point_rows, t_interval
from ercstudy.platform.study.spec import load_study, parse_study


def trial(point, arm, seed, value, params, status="completed", alpha=None, n=16):
    return {"point": point, "arm": arm, "seed": seed, "eval/loss": value, "status": status, "params": params,
            "alpha": alpha, "num_experts": n, **params}


def test_t_interval_and_its_p_value_match_scipy():
    rng = np.random.default_rng(0)
    x = list(rng.normal(0.3, 1.0, size=5))
    ci = t_interval(x)
    low, high = stats.t.interval(0.95, 4, loc=np.mean(x), scale=stats.sem(x))
    assert (ci.low, ci.high) == pytest.approx((low, high)) and ci.p == pytest.approx(stats.ttest_1samp(x, 0).pvalue)
    one = t_interval([2.0])
    assert one.mean == 2.0 and math.isnan(one.low) and math.isnan(one.p)


def test_holm_matches_the_step_down_procedure():
    assert holm([0.01, 0.04, math.nan, 0.03]) == pytest.approx([0.03, 0.06, math.nan, 0.06], nan_ok=True)


def test_points_pair_with_the_baseline_at_equal_seeds_and_expert_count():
    study = load_study("search_spaces/alpha_epsilon.yaml")
    rng = np.random.default_rng(1)
    trials = []
    base = {16: [3.0, 3.2, 3.1], 64: [2.5, 2.8, 2.6]}
    for n, values in base.items():
        for s, v in enumerate(values):
            trials.append(trial(f"baseline:erc.enabled=False, moe.num_experts={n}", "baseline", s, v,
                                {"erc.enabled": False, "moe.num_experts": n, "train.seed": s}, n=n))
    for k, (n, shift) in enumerate([(16, -0.2), (64, 0.01)]):
        for s in range(3):
            params = {"erc.alpha": 1.0, "erc.epsilon": "auto", "moe.num_experts": n, "train.seed": s}
            trials.append(trial(f"p{k}", "search", s, base[n][s] + shift + rng.normal(0, 0.01), params, alpha=1.0, n=n))
    trials.append(trial("p0", "search", 3, 0.1, {"erc.alpha": 1.0, "moe.num_experts": 16, "train.seed": 3}, status="failed", alpha=1.0))
    rows = {r["point"]: r for r in point_rows(study, trials)}
    p0, p1 = rows["p0"], rows["p1"]
    assert p0["baseline"].endswith("moe.num_experts=16") and p1["baseline"].endswith("moe.num_experts=64")
    assert p0["seeds"] == p0["pairs"] == 3  # the failed seed counts nowhere
    ours = [t["eval/loss"] for t in trials if t["point"] == "p0" and t["status"] == "completed"]
    diffs = [a - b for a, b in zip(ours, base[16])]
    assert p0["diff"] == pytest.approx(np.mean(diffs)) and p0["p"] == pytest.approx(stats.ttest_rel(ours, base[16]).pvalue)
    assert p0["significant"] == "better" and p1["significant"] == "no"
    assert p0["p_holm"] == pytest.approx(min(1.0, 2 * min(p0["p"], p1["p"])))  # Holm: the smaller p-value times two
    assert p1["p_holm"] == pytest.approx(max(p0["p_holm"], min(1.0, p1["p"])))  # ... the other one times one, monotone
    assert p0["confounded_by"] == p1["confounded_by"] == ""  # the arm fixes the expert count: equal params
    assert "diff" not in rows["baseline:erc.enabled=False, moe.num_experts=16"]  # the baseline is not compared with itself


def test_a_point_whose_other_params_differ_from_the_baseline_says_it_is_confounded():
    data = yaml.safe_load(open("search_spaces/quickstart.yaml"))
    data["scheduler"] = {"type": "none"}
    data["search"].update(repeats=2, arms={"baseline": {"erc.enabled": False}})  # at the base's 8 experts, lr 0.003
    study = parse_study(data)
    trials = [trial("baseline:erc.enabled=False", "baseline", s, 3.0 + s, {"erc.enabled": False, "train.seed": s}) for s in (0, 1)]
    same = {"erc.alpha": 0.7, "moe.num_experts": 8, "moe.top_k": 2, "train.lr": 0.003}
    other = {**same, "moe.num_experts": 4, "train.lr": 0.001}
    for k, params in enumerate([same, other]):
        trials += [trial(f"p{k}", "search", s, 2.9 + s + 0.01 * k, {**params, "train.seed": s}, alpha=0.7) for s in (0, 1)]
    rows = {r["point"]: r for r in point_rows(study, trials)}
    assert rows["p0"]["confounded_by"] == ""  # alpha is ERC's own: the comparison is the point
    assert rows["p1"]["confounded_by"] == "moe.num_experts, train.lr"


def test_best_alpha_groups_hold_erc_trials_at_equal_other_params_or_say_they_are_confounded():
    study = load_study("search_spaces/alpha_epsilon.yaml")
    trials = [trial("b", "baseline", 0, 3.0, {"erc.enabled": False, "moe.num_experts": 16})]
    for a in (0.4, 1.0, 3.0):
        for eps in ("auto", 0.0):
            trials.append(trial("p", "search", 0, 3.0, {"erc.alpha": a, "erc.epsilon": eps, "moe.num_experts": 16}, alpha=a))
    groups = alpha_groups(study, trials)
    assert [g.label for g in groups] == ["experts=16, erc.epsilon=auto", "experts=16, erc.epsilon=0.0"]
    assert all(len(g.trials) == 3 and not g.confounded for g in groups)
    quick = parse_study(yaml.safe_load(open("search_spaces/quickstart.yaml")))
    rng = np.random.default_rng(2)
    sampled = [trial(f"p{i}", "search", 0, 3.0, {"erc.alpha": float(rng.uniform(0.5, 1.2)), "moe.num_experts": 8,
                                                 "moe.top_k": 2, "train.lr": float(rng.uniform(1e-4, 3e-3))}, alpha=0.7, n=8)
               for i in range(4)]
    for t in sampled:
        t["alpha"] = t["params"]["erc.alpha"]
    (group,) = alpha_groups(quick, sampled)
    assert group.label == "experts=8" and group.confounded == ["train.lr"] and len(group.trials) == 4


def test_any_metric_is_compared_and_a_cost_as_a_paired_ratio():
    """The report compares more than the objective: alpha* as a paired difference, tokens/s as a paired ratio."""
    study = load_study("search_spaces/paper_comparison.yaml")
    trials = []
    for s in range(3):
        for point, arm, params, alpha_star, speed in (("vanilla:erc.enabled=False", "vanilla", {"erc.enabled": False}, 1.7, 100.0),
                                                      ("p0", "search", {"erc.alpha": 0.6}, 0.5 + 0.01 * s, 99.0 - s),
                                                      ("aoe", "aoe", {"erc.enabled": False, "moe.kind": "aoe"}, 0.9, 60.0 + s)):
            t = trial(point, arm, s, 3.0, {**params, "train.seed": s})
            trials.append({**t, "alpha_star": alpha_star + 0.001 * s, "tokens_per_s": speed + s})
    star = {r["point"]: r for r in point_rows(study, trials, "alpha_star")}
    assert star["p0"]["diff"] == pytest.approx(np.mean([(0.5 + 0.01 * s) - 1.7 for s in range(3)]))
    assert star["p0"]["significant"] == "better"  # lower alpha* is tighter coupling
    speed = {r["point"]: r for r in point_rows(study, trials, "tokens_per_s", ratio=True)}
    ratios = [(60.0 + 2 * s) / (100.0 + s) for s in range(3)]
    assert speed["aoe"]["diff"] == pytest.approx(np.mean(ratios))
    assert speed["aoe"]["p"] == pytest.approx(stats.ttest_1samp(np.array(ratios) - 1, 0).pvalue)
    assert speed["aoe"]["significant"] == "worse" and "diff" not in speed["vanilla:erc.enabled=False"]
