"""The paper's comparison preset end to end, shrunk: the vanilla MoE, Autonomy-of-Experts and ERC arms at one seed
(three TorchTrainer trials at once on the shared local Ray, a real MLflow store), then the report: each arm's value,
the paired differences of ERC and AoE to the vanilla arm, and the cost ratios. (Intervals over several seeds:
tests/platform/report/test_comparison.py and tests/integration/test_study_seeds_run.py.)"""

import csv

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def comparison(ray_session, tmp_path_factory):
    from ercstudy.platform.report.study_report import write_report
    from ercstudy.platform.study.driver import load_saved_study, run_study
    from ercstudy.platform.study.spec import load_study

    tmp = tmp_path_factory.mktemp("comparison")
    path = tmp / "comparison.yaml"
    path.write_text(open("search_spaces/paper_comparison.yaml").read())
    storage = str(tmp / "results")
    overrides = ["search.repeats=1", "base.train.tokens=4096", "base.train.report_every=4", "base.train.checkpoint_every=8",
                 "base.eval.every=8", "base.eval.mc_items=0", "base.model.d_model=32", "base.moe.expert_dim=32",
                 f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
    board = run_study(load_study(path, overrides), storage=storage, progress_every_s=1e9)
    study, state = load_saved_study(storage, "paper_comparison")
    return board, write_report(study, state, storage=storage)


def test_all_three_arms_train(comparison):
    board, _ = comparison
    assert len(board) == 3 and all(r["status"] == "completed" for r in board), board
    arms = sorted((str(r.get("moe.kind") or "routed"), str(r.get("erc.enabled", "searched")), r["train.seed"]) for r in board)
    assert arms == [("aoe", "False", 0), ("routed", "False", 0), ("routed", "searched", 0)], board


def test_the_report_pairs_erc_and_aoe_with_the_vanilla_arm_and_gives_the_cost_ratios(comparison):
    from pathlib import Path

    _, out = comparison
    points = {r["point"]: r for r in csv.DictReader(open(Path(out) / "points.csv"))}
    vanilla = "vanilla:erc.enabled=False"
    aoe = "aoe:erc.enabled=False, moe.kind=aoe"
    assert set(points) == {"p0", vanilla, aoe}
    assert points["p0"]["baseline"] == points[aoe]["baseline"] == vanilla and points["p0"]["pairs"] == points[aoe]["pairs"] == "1"
    metrics = {(r["metric"], r["point"]): r for r in csv.DictReader(open(Path(out) / "metrics.csv"))}
    for point in ("p0", aoe):
        for cost in ("tokens_per_s", "peak_memory_mb"):
            assert 0 < float(metrics[cost, point]["diff"]) < 10, (cost, point)  # a ratio to the vanilla arm
        assert float(metrics["alpha_star", point]["seeds"]) == 1
    assert ("eps_mean", aoe) not in metrics and ("eps_mean", "p0") in metrics  # no router rows in AoE: no eps
    report = (Path(out) / "report.md").read_text()
    assert "### tokens_per_s (ratio to the baseline arm)" in report and "### diag_dominance" in report
    assert yaml.safe_load(open("search_spaces/paper_comparison.yaml"))["search"]["baseline"] == "vanilla"
