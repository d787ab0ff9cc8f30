"""Seeds and fixed arms (study.py, search.py, dry_run.py): `search.repeats` runs every point at several
seeds and tells Optuna the mean once all of them ended; `search.arms` (the no-ERC baseline) run at the
same seeds and are never told; ASHA is refused with either. No Ray: Tune's calls are made by hand."""

import pickle

import pytest
import yaml
from optuna.trial import TrialState

from ercstudy.platform.cli import main
from ercstudy.platform.study.plan import plan_study
from ercstudy.platform.study.search import build_search, point_tags
from ercstudy.platform.study.spec import load_study, parse_study
from ercstudy.trainables.validation import ConfigError

QUICKSTART = yaml.safe_load(open("search_spaces/quickstart.yaml"))


def spec(search=None, **changes):
    data = yaml.safe_load(yaml.safe_dump(QUICKSTART))
    data["scheduler"] = {"type": "none"}
    data["search"] = {**data["search"], "params": {"erc.alpha": [0.5, 1.0]}, "sampler": "grid", "num_trials": 2,
                      "repeats": 2, "arms": {"baseline": {"erc.enabled": False}}, "constraints": [], **(search or {})}
    data.update(changes)
    return data


def result(step, total=60, **metrics):
    return {"step": step, "total_steps": total, **metrics}


def test_the_papers_sweep_counts_its_trials_and_seeds():
    study = load_study("search_spaces/alpha_epsilon.yaml")
    assert plan_study(study).points == 6 * 2 * 2 and study.search.repeats == 3 and plan_study(study).seeds == (0, 1, 2)
    assert list(plan_study(study).arms) == [("baseline", {"erc.enabled": False, "moe.num_experts": 16}),
                                 ("baseline", {"erc.enabled": False, "moe.num_experts": 64})]
    assert plan_study(study).num_trials == (24 + 2) * 3 and study.search.baseline_arm == "baseline"
    assert study.scheduler.type == "none" and study.base_config.erc.router_grad is False


def test_dry_run_prints_the_trial_count_and_gpu_hours(capsys):
    assert main(["dry-run", "search_spaces/alpha_epsilon.yaml"]) == 0
    out = capsys.readouterr().out
    assert "78 trials = (24 point(s) + 2 arm point(s): baseline) x 3 seed(s)" in out
    hours = next(line for line in out.splitlines() if line.startswith("GPU-hours: "))
    assert float(hours.split()[1].replace(",", "")) > 1 and "MFU 0.3" in hours


@pytest.mark.parametrize("change,where", [
    ({"scheduler": {"type": "asha", "grace_period": 10}}, r"^scheduler\.type: must be none with search\.repeats > 1 or search\.arms"),
    ({"search": {"params": {"train.seed": [1, 2]}}}, r"^search\.params\.train\.seed: is set by search\.repeats"),
    ({"search": {"arms": {"baseline": {"erc.enabeld": False}}}}, r"^search\.params\.erc\.enabeld: not a trial-config path"),
    ({"search": {"arms": {"baseline": {"train.seed": 3}}}}, r"^search\.arms\.baseline\.train\.seed: arms run at the study's seeds"),
    ({"search": {"arms": {"baseline": {"moe.top_k": 99}}}}, r"^search\.arms\.baseline: moe\.top_k: must be <= num_experts"),
    ({"search": {"arms": {"base line": {"erc.enabled": False}}}}, r"^search\.arms\.base line: an arm name is"),
    ({"search": {"baseline": "control"}}, r"^search\.baseline: must name one of search\.arms \(baseline\)"),
    ({"search": {"repeats": 0}}, r"^search\.repeats: must be >= 1"),
])
def test_invalid_repeats_and_arms_are_refused_naming_the_key(change, where):
    data = spec(**{k: v for k, v in change.items() if k != "search"}, search=change.get("search"))
    with pytest.raises(ConfigError, match=where):
        parse_study(data)


def test_arm_lists_are_crossed():
    study = parse_study(spec(search={"arms": {"baseline": {"erc.enabled": False, "moe.num_experts": [4, 8]},
                                              "strict": {"erc.alpha": 0.3}}}))
    assert [a for a, _ in list(plan_study(study).arms)] == ["baseline", "baseline", "strict"]
    assert plan_study(study).num_trials == (2 + 3) * 2


def test_each_point_runs_at_every_seed_and_optuna_sees_the_mean():
    study = parse_study(spec())
    search = build_search(plan_study(study))
    configs = [search.suggest(f"t{i}") for i in range(6)]  # 1 arm point + 2 grid points, 2 seeds each
    assert [c["point"]["arm"] for c in configs] == ["baseline"] * 2 + ["search"] * 4
    assert [c["params"]["train.seed"] for c in configs] == [0, 1] * 3
    assert configs[0]["params"] == {"erc.enabled": False, "train.seed": 0}
    assert configs[2]["point"]["id"] == configs[3]["point"]["id"] == "p0" and configs[4]["point"]["id"] == "p1"
    assert configs[2]["params"]["erc.alpha"] == configs[3]["params"]["erc.alpha"] != configs[4]["params"]["erc.alpha"]
    assert point_tags(configs[3]) == {"ercstudy.point": "p0", "ercstudy.arm": "search", "ercstudy.repeat": "1"}
    assert search.suggest("t3") is configs[3]  # asked again: the same config
    for tid in ("t0", "t1"):  # the arm's trials: never told
        search.on_trial_complete(tid, result(60, **{"eval/loss": 9.0}))
    search.on_trial_result("t2", result(20, **{"eval/loss": 2.5}))  # several seeds: no intermediate values
    search.on_trial_complete("t2", result(60, **{"eval/loss": 2.0}))
    assert search.optuna_study.trials[0].state == TrialState.RUNNING  # its other seed still runs
    search.on_trial_complete("t3", result(60, **{"eval/loss": 3.0}))
    search.on_trial_complete("t4", result(60, **{"eval/loss": 1.0}))
    search.on_trial_complete("t5", None, error=True)
    trials = search.optuna_study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[0].value == pytest.approx(2.5) and trials[0].intermediate_values == {}
    restored = pickle.loads(pickle.dumps(search.__dict__))  # Tune saves the searcher with its state
    assert restored["ended"][0].keys() == {"t2", "t3"}


def test_plain_studies_keep_plain_configs():
    data = spec(search={"repeats": 1, "arms": {}})
    search = build_search(plan_study(parse_study(data)))
    config = search.suggest("a")
    assert set(config) == {"params"} and "train.seed" not in config["params"] and point_tags(config) == {}


def test_the_paper_comparison_runs_vanilla_aoe_and_erc_at_the_same_seeds():
    plan = plan_study(load_study("search_spaces/paper_comparison.yaml"))
    assert [a for a, _ in plan.arms] == ["vanilla", "aoe"] and plan.seeds == (0, 1, 2) and plan.num_trials == 9
    kinds = {arm: (plan.trial_config(p).moe.kind, plan.trial_config(p).erc.enabled) for arm, p in plan.arms}
    assert kinds == {"vanilla": ("routed", False), "aoe": ("aoe", False)}
    erc = plan.trial_config({"erc.alpha": 0.6})
    assert (erc.moe.kind, erc.erc.enabled) == ("routed", True) and plan.study.search.baseline_arm == "vanilla"
    aoe = plan.trial_config(dict(plan.arms)["aoe"])
    assert abs(aoe.num_params() - erc.num_params()) / erc.num_params() < 0.02  # the arms differ in routing only
