"""A tiny study with repeats, a baseline arm and lm-eval tasks, end to end on the shared local Ray with a real
MLflow SQLite store: six points a seeded random sampler draws (ERC's alpha, the model width, the token budget)
and the no-ERC baseline arm, each at 2 seeds, fourteen TorchTrainer trials on Parquet shards of real text
(conftest's `shards`); every trial runs the two tiny local tasks of tests/fixtures/harness (a multiple-choice one
and a loglikelihood_rolling one, from JSONL) on its own worker at its last step (`eval.harness`), and the study
ranks by a harness metric. Then `ercstudy report` from MLflow holds each point's interval, the paired difference
to the baseline at equal seeds, the parameter importances from the study's Optuna store and the scaling fits.
(Refusals of bad harness configs, and a failed evaluation: tests/integration/test_lm_eval_in_study.py.)"""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES

pytest.importorskip("lm_eval", reason="the `evals` extra (lm-evaluation-harness) is not installed")
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

TOKENS_PER_STEP = 8 * 32  # global batch x seq_len
STEPS = 8  # the base config's (and the baseline arm's)
WIDTHS, TOKENS = [16, 32, 48], [4 * TOKENS_PER_STEP, 8 * TOKENS_PER_STEP, 12 * TOKENS_PER_STEP]
BUDGET = 1e12  # FLOPs, at which the fits predict the objective (`ercstudy report --budget`)
POINTS = 6  # the fewest completed points that importances take (importance.MIN_TRIALS) and the fewest trials Chinchilla's fit takes
OBJECTIVE = "harness/tiny_passages/bits_per_byte"
HARNESS_METRICS = ["harness/tiny_next_line/acc", "harness/tiny_next_line/acc_norm", "harness/tiny_passages/word_perplexity", OBJECTIVE]


def spec(shards) -> dict:
    return {
        "name": "seeds_tiny",
        "base": {
            "model": {"vocab_size": 320, "d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
            "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
            "erc": {"enabled": True, "alpha": 1.0, "epsilon": "auto"},
            "train": {"seed": 5, "tokens": STEPS * TOKENS_PER_STEP, "global_batch_size": 8, "micro_batch_size": 8, "lr": 0.01,
                      "warmup_steps": 2, "report_every": 4, "checkpoint_every": 8},
            "data": {"kind": "parquet", "path": str(shards)},
            "eval": {"every": 8, "sequences": 8, "mc_items": 0,
                     "harness": {"tasks": ["tiny_next_line", "tiny_passages"], "include_path": str(FIXTURES / "harness" / "tasks"),
                                 "data_dir": str(FIXTURES / "harness"), "at": "final", "limit": 4, "batch_size": 16}},
        },
        # seed 6 draws every width and token budget, N and D nearly uncorrelated (asserted below): Chinchilla's fit is identified
        "search": {"sampler": "random", "seed": 6, "num_trials": POINTS, "repeats": 2,
                   "params": {"erc.alpha": {"type": "float", "low": 0.4, "high": 1.6}, "model.d_model": WIDTHS, "train.tokens": TOKENS},
                   "arms": {"baseline": {"erc.enabled": False}}},
        "objective": {"metric": OBJECTIVE, "mode": "min"},
        "scheduler": {"type": "none"},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5},  # four trials at once: tiny trials wait on Ray more than they compute
    }


@pytest.fixture(scope="module")
def study_run(ray_session, shards, tmp_path_factory):
    from ercstudy.platform.report.study_report import write_report
    from ercstudy.platform.study.driver import load_saved_study, run_study
    from ercstudy.platform.study.spec import load_study

    tmp = tmp_path_factory.mktemp("seeds")
    uri = f"sqlite:///{tmp}/mlflow.db"
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump({**spec(shards), "tracking": {"uri": uri, "experiment": "seeds_tiny"}}))
    storage = str(tmp / "results")
    board = run_study(load_study(path), storage=storage, progress_every_s=1e9)
    study, state = load_saved_study(storage, "seeds_tiny")
    out = write_report(study, state, storage=storage, budget=BUDGET)
    return {"board": board, "uri": uri, "state": state, "report": out, "dir": tmp / "results" / "seeds_tiny"}


def steps_of(run) -> int:
    return int(run.data.params["train.tokens"]) // TOKENS_PER_STEP


BASELINE = "baseline:erc.enabled=False"
BASE_VALUES = {"model.d_model": 32, "train.tokens": STEPS * TOKENS_PER_STEP}  # the base config's, the baseline arm's
SEARCHED = [f"p{i}" for i in range(POINTS)]


def test_every_point_ran_at_every_seed_with_shared_mlflow_tags(study_run):
    from mlflow.tracking import MlflowClient

    board = study_run["board"]
    assert len(board) == 2 * (POINTS + 1) and all(r["status"] == "completed" for r in board), board
    c = MlflowClient(study_run["uri"])
    runs = c.search_runs([study_run["state"].experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study_run['state'].parent_run_id}'")
    by_point = {}
    for r in runs:
        by_point.setdefault(r.data.tags["ercstudy.point"], []).append(r)
    assert sorted(by_point) == [BASELINE, *SEARCHED]
    for point, rs in by_point.items():
        assert sorted(r.data.params["search.train.seed"] for r in rs) == ["5", "6"]  # the same seeds in both arms
        assert {r.data.tags["ercstudy.arm"] for r in rs} == {"baseline" if point == BASELINE else "search"}
        assert len({(r.data.params["erc.alpha"], r.data.params["model.d_model"], r.data.params["train.tokens"]) for r in rs}) == 1
    assert {r.data.params["erc.enabled"] for r in by_point[BASELINE]} == {"False"}
    # what makes the scaling fit identifiable: every width and token budget drawn, N and D not moving together
    children = [r for rs in by_point.values() for r in rs]
    assert {int(r.data.params["model.d_model"]) for r in children} == set(WIDTHS)
    assert {int(r.data.params["train.tokens"]) for r in children} == set(TOKENS)


def test_the_report_holds_intervals_and_the_paired_difference(study_run):
    out = Path(study_run["report"])
    rows = {r["point"]: r for r in csv.DictReader((out / "points.csv").open())}
    assert set(rows) == {BASELINE, *SEARCHED}
    board = list(csv.DictReader((out / "leaderboard.csv").open()))  # the report's: a trial's point and params
    p_width = {r["point"]: r["model.d_model"] for r in board if r["point"] in SEARCHED}
    p_tokens = {r["point"]: r["train.tokens"] for r in board if r["point"] in SEARCHED}
    base = rows[BASELINE]
    for r in rows.values():
        assert r["seeds"] == "2" and float(r["ci_low"]) < float(r["mean"]) < float(r["ci_high"])
    for point in SEARCHED:
        p = rows[point]
        assert p["baseline"] == BASELINE and p["pairs"] == "2"
        assert float(p["diff_low"]) <= float(p["diff"]) <= float(p["diff_high"])
        assert float(p["diff"]) == pytest.approx(float(p["mean"]) - float(base["mean"]), abs=1e-9)
        assert p["significant"] in ("better", "worse", "no")
        # the baseline arm runs at the base's width and token budget: a point drawn at others says so
        drawn = {path: int(v) for path, v in (("model.d_model", p_width[point]), ("train.tokens", p_tokens[point]))}
        assert p["confounded_by"] == ", ".join(k for k, v in drawn.items() if v != BASE_VALUES[k])
    md = (out / "report.md").read_text()
    assert f"## Points: {OBJECTIVE} over seeds" in md and "Holm-corrected" in md
    assert "CONFOUNDED: the points with `confounded_by` differ from their baseline in model.d_model, train.tokens" in md
    # the best-alpha group holds the ERC trials only, and says the width and token budget confound it
    assert "experts=4" in md and f"({2 * POINTS} trials)" in md and "CONFOUNDED" in md


def test_the_report_holds_importances_from_the_optuna_store_and_the_scaling_fits(study_run):
    out = Path(study_run["report"])
    md = (out / "report.md").read_text()
    fits = json.loads((out / "fits.json").read_text())
    # importances: one per searched param for the objective, alpha* and eps, over the six points (the means of their seeds)
    assert "## Parameter importances (PED-ANOVA)" in md
    assert f"| param | {OBJECTIVE} (low) | alpha* (low) | eps (high) |" in md
    assert f"over {POINTS} completed points (PED-ANOVA: the best 2 points against all" in md and "Indicative only" in md
    for label in (f"{OBJECTIVE} (low)", "alpha* (low)", "eps (high)"):
        imp = fits["importances"][label]
        assert set(imp) == {"erc.alpha", "model.d_model", "train.tokens"}, imp
        assert all(v >= 0 for v in imp.values()) and sum(imp.values()) == pytest.approx(1.0)
    # Chinchilla's L(N, D) over all fourteen trials, each parameter with its bootstrap interval
    chin = fits["scaling"]["chinchilla"]
    assert "skipped" not in chin, chin
    assert chin["n"] == 2 * (POINTS + 1) and set(chin["params"]) == {"E", "A", "a", "B", "b"}
    for value, low, high in chin["params"].values():
        assert low <= value <= high
    assert "Chinchilla: L(N, D) = E + A / N^a + B / D^b" in md and "bootstrap draws identified" in md
    at = chin["budget"]
    assert at["C"] == BUDGET and at["N_opt"] * at["D_opt"] * at["k"] == pytest.approx(BUDGET) and at["loss"] > 0
    assert f"- at C = {BUDGET:.3g} FLOPs" in md and "compute-optimal N" in md and "extrapolated" in md
    # the routed form: one expert count, so one line that says why it is not fitted
    assert fits["scaling"]["routed"]["skipped"] == "the routed form needs >= 2 distinct expert counts E, got 1"
    assert "- not fitted: the routed form needs >= 2 distinct expert counts E, got 1" in md


def test_every_trial_runs_the_tasks_at_its_end_and_the_study_ranks_by_a_harness_metric(study_run):
    board = study_run["board"]
    for row in board:
        assert all(isinstance(row.get(m), float) and math.isfinite(row[m]) for m in HARNESS_METRICS), row
        assert 0 <= row["harness/tiny_next_line/acc"] <= 1 and row["harness/failed"] == 0.0
    objective = [row[OBJECTIVE] for row in board]
    assert objective == sorted(objective) and len(set(objective)) > 1  # the leaderboard's order is the harness objective's
    header = (study_run["dir"] / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert set(HARNESS_METRICS) <= set(header), header


def test_the_harness_results_are_in_every_child_run_at_the_last_step_and_the_best_in_the_parent(study_run):
    from mlflow.tracking import MlflowClient

    from ercstudy.platform.tracking.client import HARNESS_TAG

    c = MlflowClient(study_run["uri"])
    runs = c.search_runs([study_run["state"].experiment_id], max_results=100)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 * (POINTS + 1)
    for run in children:
        rid = run.info.run_id
        assert set(HARNESS_METRICS) <= run.data.metrics.keys(), run.data.metrics.keys()
        steps = steps_of(run)
        assert [m.step for m in c.get_metric_history(rid, OBJECTIVE)] == [steps]
        assert run.data.tags[HARNESS_TAG] == f"evaluated at step {steps}"
        results = json.loads(Path(c.download_artifacts(rid, f"harness/results_step{steps}.json")).read_text())
        assert results["results"]["tiny_passages"]["bits_per_byte,none"] == pytest.approx(run.data.metrics[OBJECTIVE])
        assert results["config"]["step"] == steps and results["n-samples"]["tiny_next_line"]["effective"] == 4  # limit: 4
    best = min(children, key=lambda r: r.data.metrics[OBJECTIVE])
    assert parent.data.metrics[f"best/{OBJECTIVE}"] == pytest.approx(best.data.metrics[OBJECTIVE])
    assert OBJECTIVE in Path(c.download_artifacts(parent.info.run_id, "leaderboard.csv")).read_text().splitlines()[0]
