"""The search (platform/study/search.py): Optuna's define-by-run space under the constraints, the searcher
that tells Optuna how each trial ended, and ASHA's budget. No Ray cluster: Tune's calls are made by hand."""

import contextlib
import pickle

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from ercstudy.platform.study.plan import plan_study
from ercstudy.platform.study.search import (
    DefineByRun,
    build_scheduler,
    build_search,
    optuna_sampler,
    sample_point,
)
from ercstudy.platform.study.spec import parse_study

QUICKSTART = yaml.safe_load(open("search_spaces/quickstart.yaml"))
SEARCH = QUICKSTART["search"]


def spec(**changes):
    data = yaml.safe_load(yaml.safe_dump(QUICKSTART))
    data.update(changes)
    return data


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid"])
def test_constraints_hold_on_every_sampled_point(sampler):
    data = spec(search={**SEARCH, "sampler": sampler, "num_trials": 100, "params": {
        "moe.num_experts": [2, 4, 8], "moe.top_k": {"type": "int", "low": 1, "high": 8},
        "erc.alpha": [0.5, 1.0] if sampler == "grid" else {"type": "float", "low": 0.5, "high": 1.0}}})
    study = parse_study(data)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ot = optuna.create_study(sampler=optuna_sampler(study))
    seen = set()
    n = 40 if sampler != "grid" else plan_study(study).num_trials
    if sampler == "grid":
        assert n == 2 * (2 + 4 + 8)  # alpha x (top_k <= num_experts): the grid has no invalid point
    for _ in range(n):
        trial = ot.ask()
        point = sample_point(study, trial)
        assert 1 <= point["moe.top_k"] <= point["moe.num_experts"]
        study.trial_config(point)  # a valid trial config
        seen.add((point["moe.num_experts"], point["moe.top_k"]))
        with contextlib.suppress(RuntimeError):  # the grid's last tell stops the study (outside optimize(): an error)
            ot.tell(trial, point["erc.alpha"])
    assert any(k == e for e, k in seen) and len({e for e, _ in seen}) >= 2  # the narrowed range reaches its ends
    if sampler == "grid":
        assert len(seen) == 14  # every (num_experts, top_k) pair once per alpha


def test_fixed_optuna_trial_sees_the_narrowed_range():
    data = spec(search={**SEARCH, "params": {"moe.num_experts": [2, 8], "moe.top_k": {"type": "int", "low": 1, "high": 4}}})
    study = parse_study(data)
    point = sample_point(study, optuna.trial.FixedTrial({"moe.num_experts": 2, "moe.top_k|1..2": 2}))
    assert point == {"moe.num_experts": 2, "moe.top_k": 2}
    # with two experts the full range is not on offer: a value for the unconstrained name is not even asked for
    with pytest.raises(ValueError, match=r"moe.top_k\|1..2"):
        sample_point(study, optuna.trial.FixedTrial({"moe.num_experts": 2, "moe.top_k": 4}))
    assert sample_point(study, optuna.trial.FixedTrial({"moe.num_experts": 8, "moe.top_k": 4}))["moe.top_k"] == 4


def result(step, total=60, **metrics):
    return {"step": step, "total_steps": total, "training_iteration": step // 10, **metrics}


def told_states(search):
    return {t.number: t.state for t in search.optuna_study.get_trials(deepcopy=False)}


def test_the_searcher_tells_optuna_how_each_trial_ended():
    search = build_search(plan_study(parse_study(spec())))
    configs = {tid: search.suggest(tid) for tid in "abcd"}
    assert all(set(c) == {"params"} and c["params"]["moe.top_k"] <= c["params"]["moe.num_experts"] for c in configs.values())
    search.on_trial_result("a", result(10, lm_loss=3.0))  # no eval/loss yet: nothing told
    search.on_trial_result("a", result(20, **{"eval/loss": 2.5}))
    assert search.optuna_study.trials[0].intermediate_values == {20: 2.5}
    search.on_trial_complete("a", result(60, **{"eval/loss": 2.0}))  # its whole budget: COMPLETE
    search.on_trial_complete("b", result(20, **{"eval/loss": 2.4}))  # stopped by ASHA: PRUNED, not COMPLETE at 2.4
    search.on_trial_complete("c", result(30, **{"eval/loss": 9.9}, stop_reason="non-finite loss"))  # FAIL
    search.on_trial_complete("d", None, error=True)  # FAIL
    search.on_trial_complete("a", result(60, **{"eval/loss": 1.0}))  # told once only
    assert told_states(search) == {0: TrialState.COMPLETE, 1: TrialState.PRUNED, 2: TrialState.FAIL, 3: TrialState.FAIL}
    assert search.optuna_study.best_value == 2.0


def test_multi_objective_searcher_and_its_state_survive_a_save(tmp_path):
    study = parse_study(spec(objective=[{"metric": "eval/loss", "mode": "min"}, {"metric": "tokens_per_s", "mode": "max"}]))
    search = build_search(plan_study(study))
    assert search.metric == ["eval/loss", "tokens_per_s"] and search.mode == ["min", "max"]
    search.suggest("a")
    search.on_trial_result("a", result(20, **{"eval/loss": 2.5, "tokens_per_s": 900.0}))  # no intermediate values: ignored
    search.on_trial_complete("a", result(60, **{"eval/loss": 2.0, "tokens_per_s": 1000.0}))
    search.save(str(tmp_path / "searcher.pkl"))
    restored = build_search(plan_study(study))
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert [t.values for t in restored.optuna_study.trials] == [[2.0, 1000.0]] and restored.told == {"a"}
    assert "params" in restored.suggest("b")  # goes on asking the same study
    assert len(restored.optuna_study.trials) == 2
    pickle.dumps(DefineByRun(study))  # Tune pickles the space with the searcher


def test_asha_budget_is_the_longest_trial_of_the_space():
    study = parse_study(spec(scheduler={"type": "asha", "time_attr": "step", "grace_period": 20, "reduction_factor": 2}))
    assert plan_study(study).budget == study.base_config.steps == 60
    assert type(build_scheduler(plan_study(study))).__name__ == "AsyncHyperBandScheduler"
    tokens = parse_study(spec(scheduler={"type": "asha", "time_attr": "tokens", "grace_period": 1000}))
    cfg = tokens.base_config
    assert plan_study(tokens).budget == cfg.steps * cfg.train.global_batch_size * cfg.model.seq_len
    assert build_scheduler(plan_study(parse_study(spec(scheduler={"type": "none"})))) is None
