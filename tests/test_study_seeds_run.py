"""A tiny study with repeats and a baseline arm, end to end on the shared local Ray with a real MLflow
SQLite store: one searched point (ERC, alpha 0.8) and the no-ERC baseline arm, each at 2 seeds, four
TorchTrainer trials; then `ercstudy report` from MLflow holds each point's interval and the paired
difference to the baseline at equal seeds."""

import csv

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

SPEC = {
    "name": "seeds_tiny",
    "base": {
        "model": {"vocab_size": 256, "d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
        "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
        "erc": {"enabled": True, "alpha": 1.0, "epsilon": "auto"},
        "train": {"seed": 5, "tokens": 8 * 8 * 32, "global_batch_size": 8, "micro_batch_size": 8, "lr": 0.003,
                  "warmup_steps": 2, "report_every": 4, "checkpoint_every": 8},
        "data": {"kind": "synthetic", "num_domains": 4, "tokens_per_domain": 48, "shared_tokens": 16},
        "eval": {"every": 8, "sequences": 8, "mc_items": 0},
    },
    "search": {"sampler": "grid", "num_trials": 1, "repeats": 2, "params": {"erc.alpha": [0.8]},
               "arms": {"baseline": {"erc.enabled": False}}},
    "objective": {"metric": "eval/loss", "mode": "min"},
    "scheduler": {"type": "none"},
    "resources": {"num_workers": 1, "cpus_per_worker": 1},
}


@pytest.fixture(scope="module")
def study_run(ray_session, tmp_path_factory):
    from ercstudy.platform.report import write_report
    from ercstudy.platform.runner import load_saved_study, run_study
    from ercstudy.platform.study import load_study

    tmp = tmp_path_factory.mktemp("seeds")
    uri = f"sqlite:///{tmp}/mlflow.db"
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "tracking": {"uri": uri, "experiment": "seeds_tiny"}}))
    storage = str(tmp / "results")
    board = run_study(load_study(path), storage=storage, progress_every_s=1e9)
    study, state = load_saved_study(storage, "seeds_tiny")
    out = write_report(study, state, storage=storage)
    return {"board": board, "uri": uri, "state": state, "report": out}


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
    from pathlib import Path

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
    assert "## Points: eval/loss over seeds" in md and "Holm-corrected" in md
    assert "experts=4" in md and "(2 trials)" in md  # the best-alpha group holds the ERC trials only
