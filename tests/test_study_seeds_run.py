"""A tiny study with repeats, a baseline arm and lm-eval tasks, end to end on the shared local Ray with a real
MLflow SQLite store: one searched point (ERC, alpha 0.8) and the no-ERC baseline arm, each at 2 seeds, four
TorchTrainer trials on Parquet shards of real text (conftest's `shards`); every trial runs the two tiny local
tasks of tests/fixtures/harness (a multiple-choice one and a loglikelihood_rolling one, from JSONL) on its own
worker at its last step (`eval.harness`), and the study ranks by a harness metric. Then `ercstudy report` from
MLflow holds each point's interval and the paired difference to the baseline at equal seeds.
(Refusals of bad harness configs, and a failed evaluation: tests/test_harness_in_study.py.)"""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES

pytest.importorskip("lm_eval", reason="the `evals` extra (lm-evaluation-harness) is not installed")
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 8
OBJECTIVE = "harness/tiny_passages/bits_per_byte"
HARNESS_METRICS = ["harness/tiny_next_line/acc", "harness/tiny_next_line/acc_norm", "harness/tiny_passages/word_perplexity", OBJECTIVE]


def spec(shards) -> dict:
    return {
        "name": "seeds_tiny",
        "base": {
            "model": {"vocab_size": 320, "d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
            "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
            "erc": {"enabled": True, "alpha": 1.0, "epsilon": "auto"},
            "train": {"seed": 5, "tokens": STEPS * 8 * 32, "global_batch_size": 8, "micro_batch_size": 8, "lr": 0.01,
                      "warmup_steps": 2, "report_every": 4, "checkpoint_every": 8},
            "data": {"kind": "parquet", "path": str(shards)},
            "eval": {"every": 8, "sequences": 8, "mc_items": 0,
                     "harness": {"tasks": ["tiny_next_line", "tiny_passages"], "include_path": str(FIXTURES / "harness" / "tasks"),
                                 "data_dir": str(FIXTURES / "harness"), "at": "final", "limit": 4, "batch_size": 16}},
        },
        "search": {"sampler": "grid", "num_trials": 1, "repeats": 2, "params": {"erc.alpha": [0.8]},
                   "arms": {"baseline": {"erc.enabled": False}}},
        "objective": {"metric": OBJECTIVE, "mode": "min"},
        "scheduler": {"type": "none"},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5},  # the four trials at once: tiny trials wait on Ray more than they compute
    }


@pytest.fixture(scope="module")
def study_run(ray_session, shards, tmp_path_factory):
    from ercstudy.platform.report import write_report
    from ercstudy.platform.runner import load_saved_study, run_study
    from ercstudy.platform.study import load_study

    tmp = tmp_path_factory.mktemp("seeds")
    uri = f"sqlite:///{tmp}/mlflow.db"
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump({**spec(shards), "tracking": {"uri": uri, "experiment": "seeds_tiny"}}))
    storage = str(tmp / "results")
    board = run_study(load_study(path), storage=storage, progress_every_s=1e9)
    study, state = load_saved_study(storage, "seeds_tiny")
    out = write_report(study, state, storage=storage)
    return {"board": board, "uri": uri, "state": state, "report": out, "dir": tmp / "results" / "seeds_tiny"}


def test_every_point_ran_at_every_seed_with_shared_mlflow_tags(study_run):
    from mlflow.tracking import MlflowClient

    board = study_run["board"]
    assert len(board) == 4 and all(r["status"] == "completed" for r in board), board
    c = MlflowClient(study_run["uri"])
    runs = c.search_runs([study_run["state"].experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study_run['state'].parent_run_id}'")
    by_point = {}
    for r in runs:
        by_point.setdefault(r.data.tags["ercstudy.point"], []).append(r)
    assert sorted(by_point) == ["baseline:erc.enabled=False", "p0"]
    for point, rs in by_point.items():
        assert sorted(r.data.params["search.train.seed"] for r in rs) == ["5", "6"]  # the same seeds in both arms
        assert {r.data.tags["ercstudy.arm"] for r in rs} == {"baseline" if point != "p0" else "search"}
    assert {r.data.params["erc.enabled"] for r in by_point["baseline:erc.enabled=False"]} == {"False"}


def test_the_report_holds_intervals_and_the_paired_difference(study_run):
    out = Path(study_run["report"])
    rows = {r["point"]: r for r in csv.DictReader((out / "points.csv").open())}
    assert set(rows) == {"p0", "baseline:erc.enabled=False"}
    p0, base = rows["p0"], rows["baseline:erc.enabled=False"]
    for r in (p0, base):
        assert r["seeds"] == "2" and float(r["ci_low"]) < float(r["mean"]) < float(r["ci_high"])
    assert p0["baseline"] == "baseline:erc.enabled=False" and p0["pairs"] == "2"
    assert float(p0["diff_low"]) <= float(p0["diff"]) <= float(p0["diff_high"])
    assert float(p0["diff"]) == pytest.approx(float(p0["mean"]) - float(base["mean"]), abs=1e-9)
    assert p0["significant"] in ("better", "worse", "no")
    md = (out / "report.md").read_text()
    assert f"## Points: {OBJECTIVE} over seeds" in md and "Holm-corrected" in md
    assert "experts=4" in md and "(2 trials)" in md  # the best-alpha group holds the ERC trials only


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

    from ercstudy.platform.tracking import HARNESS_TAG

    c = MlflowClient(study_run["uri"])
    runs = c.search_runs([study_run["state"].experiment_id], max_results=100)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4
    for run in children:
        rid = run.info.run_id
        assert set(HARNESS_METRICS) <= run.data.metrics.keys(), run.data.metrics.keys()
        assert [m.step for m in c.get_metric_history(rid, OBJECTIVE)] == [STEPS]
        assert run.data.tags[HARNESS_TAG] == f"evaluated at step {STEPS}"
        results = json.loads(Path(c.download_artifacts(rid, f"harness/results_step{STEPS}.json")).read_text())
        assert results["results"]["tiny_passages"]["bits_per_byte,none"] == pytest.approx(run.data.metrics[OBJECTIVE])
        assert results["config"]["step"] == STEPS and results["n-samples"]["tiny_next_line"]["effective"] == 4  # limit: 4
    best = min(children, key=lambda r: r.data.metrics[OBJECTIVE])
    assert parent.data.metrics[f"best/{OBJECTIVE}"] == pytest.approx(best.data.metrics[OBJECTIVE])
    assert OBJECTIVE in Path(c.download_artifacts(parent.info.run_id, "leaderboard.csv")).read_text().splitlines()[0]
