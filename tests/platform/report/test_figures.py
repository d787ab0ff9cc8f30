"""The report's importances, scaling fits and figures (report.py, figures.py) from a study driven by hand: the
real searcher (its Optuna store in the study directory) proposes each trial, a real MLflow SQLite store holds
the parent run and one child run per trial with synthetic, seeded metrics; `ercstudy report --budget` writes
the PNGs and logs them on the parent run. No Ray. Files and artifacts are checked, not pixels."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ercstudy.platform.cli import main
from ercstudy.platform.study.driver import SPEC_FILE, STATE_FILE, StudyState, study_path
from ercstudy.platform.study.plan import plan_study
from ercstudy.platform.study.search import build_search, point_tags
from ercstudy.platform.study.spec import parse_study
from ercstudy.platform.tracking import client as tracking

QUICKSTART = yaml.safe_load(open("search_spaces/quickstart.yaml"))
FIGURES = ["objective_vs_params.png", "loss_vs_compute.png", "eps_over_training.png", "alpha_star_vs_alpha.png",
           "coupling_matrices.png", "load_balance.png"]


def spec(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(QUICKSTART))
    data["name"] = "figs"
    data["scheduler"] = {"type": "none"}
    data["search"] = {"sampler": "random", "seed": 3, "num_trials": 14, "params": {
        "erc.alpha": {"type": "float", "low": 0.4, "high": 2.0},
        "train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
        "model.d_model": [32, 64, 128], "train.tokens": [20480, 61440, 184320], "moe.num_experts": [4, 8]},
        "arms": {"baseline": {"erc.enabled": False}}}
    data["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "figs"}
    return data


def synthetic_metrics(cfg, rng):
    """A Chinchilla-shaped loss in the trial's N and D, a learning-rate bowl, seeded noise; ERC lowers alpha*."""
    N, D = cfg.num_active_params(), cfg.trained_tokens
    loss = (1.5 + 60 / N**0.3 + 90 / D**0.3) * (1 + 0.02 * (math.log10(cfg.train.lr) + 2.5) ** 2) * math.exp(rng.normal(0, 0.002))
    alpha_star = (0.6 * cfg.erc.alpha + 0.3 if cfg.erc.enabled else 4.5) + rng.normal(0, 0.05)
    n = cfg.moe.num_experts
    m = (np.eye(n) * 2 + rng.uniform(0.2, 1.0, (n, n))).tolist()
    return {"eval/loss": loss, "alpha_star": alpha_star, "eps_mean": 0.05 + 0.01 * n + rng.normal(0, 0.002),
            "lb_loss": 1.0 + rng.normal(0, 1e-4), "load_max_over_mean": 1.2 + rng.normal(0, 0.02), "tokens": D}, [m]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("figs")
    data = spec(tmp)
    study = parse_study(data, source=str(tmp / "figs.yaml"))
    storage = str(tmp / "results")
    directory = study_path(storage, study.name)
    (directory / SPEC_FILE).write_text(yaml.safe_dump(data))
    c = MlflowClient(data["tracking"]["uri"])
    exp = c.create_experiment("figs")
    parent = c.create_run(exp, run_name="figs", tags={tracking.STUDY_TAG: "figs"}).info.run_id
    StudyState("figs", data["tracking"]["uri"], exp, parent).write(directory / STATE_FILE)
    search = build_search(plan_study(study), str(directory))
    rng = np.random.default_rng(0)
    for i in range(15):  # the baseline arm, then 14 sampled points
        tid = f"t{i:02d}"
        config = search.suggest(tid)
        cfg = study.trial_config(config["params"])
        status = "failed" if i == 5 else "stopped_early" if i == 7 else "completed"
        run = c.create_run(exp, run_name=tid, tags={tracking.PARENT_TAG: parent, tracking.TRIAL_TAG: tid,
                                                    tracking.STATUS_TAG: status, **point_tags(config)})
        rid = run.info.run_id
        for k, v in config["params"].items():
            c.log_param(rid, f"search.{k}", str(v))
        final, m = synthetic_metrics(cfg, rng)
        if status == "failed":
            c.set_terminated(rid, "FAILED")
            search.on_trial_complete(tid, None, error=True)
            continue
        steps = cfg.steps if status == "completed" else cfg.steps // 2
        for s in range(0, steps + 1, max(steps // 4, 1)):  # eps over training
            c.log_metric(rid, "eps_mean", final["eps_mean"] * (0.5 + 0.5 * s / steps), step=s)
        for k, v in final.items():
            c.log_metric(rid, k, float(v), step=steps)
        c.log_metric(rid, "step", steps, step=steps)
        if status == "completed":
            c.log_text(rid, json.dumps(m), "coupling_matrices.json")
        c.set_terminated(rid, "FINISHED")
        search.on_trial_complete(tid, {**final, "step": steps, "total_steps": cfg.steps})
    assert main(["report", "figs", "--storage", storage, "--budget", "1e21"]) == 0
    return {"dir": Path(directory.path), "client": c, "parent": parent, "storage": storage}


def test_the_figures_are_in_the_report_directory_and_on_the_parent_run(study_dir):
    out = study_dir["dir"] / "report"
    for name in FIGURES:
        assert (out / name).is_file() and (out / name).stat().st_size > 10_000, name
    logged = {a.path for a in study_dir["client"].list_artifacts(study_dir["parent"], "report")}
    assert {f"report/{name}" for name in FIGURES} <= logged
    assert {"report/report.md", "report/fits.json"} <= logged
    md = (out / "report.md").read_text()
    assert all(f"![{name}]({name})" in md for name in FIGURES)


def test_the_report_holds_importances_fits_and_the_budget_prediction(study_dir):
    md = (study_dir["dir"] / "report" / "report.md").read_text()
    assert "## Parameter importances (PED-ANOVA)" in md and "| param | eval/loss (low) | alpha* (low) | eps (high) |" in md
    assert f"optuna-dashboard sqlite:///{study_dir['dir']}/optuna.db" in md
    assert "## Scaling laws across trials" in md and "Routed (Clark et al. 2022)" in md
    fits = json.loads((study_dir["dir"] / "report" / "fits.json").read_text())
    chin = fits["scaling"]["chinchilla"]
    assert "budget" in chin and "compute-optimal N = " in md and "at C = 1e+21 FLOPs" in md, chin
    assert set(chin["params"]) == {"E", "A", "a", "B", "b"}
    assert all(lo <= v <= hi for v, lo, hi in chin["params"].values())
    imp = fits["importances"]["eval/loss (low)"]
    assert set(imp) == {"erc.alpha", "train.lr", "model.d_model", "train.tokens", "moe.num_experts"}


def test_a_non_positive_budget_is_refused_in_one_line(study_dir, capsys):
    assert main(["report", "figs", "--storage", study_dir["storage"], "--budget", "-1"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--budget -1: a compute budget is a positive number of FLOPs" in err
