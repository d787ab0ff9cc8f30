"""Study files: validation (one line, exit 2, before Ray), the corners of the constrained space, dry-run, fits.

The Optuna side of the space (sampling, the searcher, ASHA) is tested in test_search.py.
"""

import math

import numpy as np
import pytest
import yaml
from conftest import own_stderr

from ercstudy.netutil import free_ports
from ercstudy.platform.cli import main
from ercstudy.platform.report.study_report import best_alpha, fit_power_law
from ercstudy.platform.study.driver import Capacity, StudyError, concurrency, leaderboard
from ercstudy.platform.study.plan import plan_study
from ercstudy.platform.study.spec import corner_points, load_study, parse_study
from ercstudy.platform.tracking.client import TrackingError, check_reachable, resolve_uri
from ercstudy.trainables.config import TrialConfig

QUICKSTART = yaml.safe_load(open("search_spaces/quickstart.yaml"))


def spec(**changes):
    """The quickstart study with sections replaced (a value of None deletes the section)."""
    data = yaml.safe_load(yaml.safe_dump(QUICKSTART))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("path", ["search_spaces/quickstart.yaml", "search_spaces/alpha_epsilon.yaml", "search_spaces/expert_scaling.yaml",
                                  "search_spaces/paper_comparison.yaml"])
def test_shipped_studies_validate(path, capsys):
    """The quickstart trains on the built-in corpus; the others on shards a researcher prepares first: their files are
    valid, and validate refuses them, in one line, until the shards exist."""
    study = load_study(path)
    if study.base_config.data.kind == "synthetic":
        assert main(["validate", path]) == 0
        assert ": ok | study " in capsys.readouterr().out
    else:
        assert main(["validate", path]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ercstudy: error: data.path: ") and "ercstudy prepare-data" in err and "\n" not in err


SEARCH = QUICKSTART["search"]
BAD = [
    (spec(report={"metrics": ["alpha_star", "diag_dominanse"]}), "report.metrics[1]: no trial reports 'diag_dominanse' (did you mean 'diag_dominance'?)"),
    (spec(report={"metric": ["alpha_star"]}), "report.metric: unknown key; allowed: metrics"),
    (spec(seach=SEARCH), "seach: unknown section (did you mean 'search'?)"),
    (spec(search={**SEARCH, "samplr": "tpe"}), "search.samplr: unknown key (did you mean 'sampler'?)"),
    (spec(search={**SEARCH, "params": {"erc.alpah": {"type": "float", "low": 0, "high": 1}}}),
     "search.params.erc.alpah: not a trial-config path (did you mean 'erc.alpha'?)"),
    (spec(search={**SEARCH, "params": {"erc.alpha": {"type": "float", "low": 1.2, "high": 0.5}}}),
     "search.params.erc.alpha.low: must be <= high (0.5), got 1.2"),
    (spec(search={**SEARCH, "params": {"moe.num_experts": {"type": "categorical", "choices": []}}}),
     "search.params.moe.num_experts.choices: must be a non-empty list"),
    (spec(search={**SEARCH, "params": {"moe.num_experts": {"type": "float", "low": 2, "high": 8}}}),
     "search.params.moe.num_experts: is an integer field: use type int"),
    (spec(base={**QUICKSTART["base"], "moe": {"num_experts": 4, "top_k": 8}}), "base.moe.top_k: must be <= num_experts (4), got 8"),
    (spec(base={**QUICKSTART["base"], "erc": {"alpha": -0.5}}), "base.erc.alpha: must be >= 0"),
    (spec(objective={"metric": "eval/los", "mode": "min"}), "objective.metric: no trial reports 'eval/los' (did you mean 'eval/loss'?)"),
    (spec(objective={"metric": "eval/loss", "mode": "lowest"}), "objective.mode: must be 'min' or 'max'"),
    (spec(search={**SEARCH, "num_trials": 0}), "search.num_trials: must be >= 1, got 0"),
    (spec(search={**SEARCH, "constraints": ["moe.top_k <== moe.num_experts"]}), "search.constraints[0]: must read `A op B`"),
    (spec(scheduler={"type": "hyperband"}), "scheduler.type: must be one of 'none', 'asha'"),
    (spec(resources={"num_workers": 2, "ep_size": 3}), "resources.ep_size: must divide num_workers (2), got 3"),
    (spec(search={**SEARCH, "sampler": "cmaes", "params": {"erc.alpha": SEARCH["params"]["erc.alpha"]}, "constraints": []},
          objective=[{"metric": "eval/loss", "mode": "min"}, {"metric": "tokens_per_s", "mode": "max"}]),
     "search.sampler: cmaes optimizes one objective; use tpe, random or grid for a list of objectives"),
]


@pytest.mark.parametrize("data,expected", BAD)
def test_validation_errors_are_one_line_with_exit_status_2(tmp_path, capsys, data, expected):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    for command in ("validate", "dry-run", "run"):
        assert main([command, str(path), "--storage", str(tmp_path)] if command == "run" else [command, str(path)]) == 2
        err = own_stderr(capsys.readouterr().err)
        assert err.startswith("ercstudy: error: ") and expected in err and "\n" not in err, err
    assert not (tmp_path / "quickstart").exists()  # nothing started


def test_unconstrained_space_that_reaches_invalid_configs_is_refused():
    data = spec(search={**SEARCH, "params": {"moe.num_experts": [2, 4], "moe.top_k": {"type": "int", "low": 1, "high": 4}},
                        "constraints": []})
    with pytest.raises(Exception) as err:
        parse_study(data)
    assert "moe.top_k: must be <= num_experts (2), got 3" in str(err.value) and "search.constraints" in str(err.value)


def test_yaml_syntax_error_and_missing_file(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("name: x\nsearch:\n  params:\n   erc.alpha: [1\n")
    assert main(["validate", str(path)]) == 2
    assert "YAML syntax error at line" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_corners_of_the_narrowed_space():
    data = spec(search={**SEARCH, "params": {"moe.num_experts": [2, 8], "moe.top_k": {"type": "int", "low": 1, "high": 4}}})
    study = parse_study(data)
    assert {(p["moe.num_experts"], p["moe.top_k"]) for p in corner_points(study)} == {(2, 1), (2, 2), (8, 1), (8, 2), (8, 3), (8, 4)}
    # a constraint against the base config narrows as well: base num_experts is 8 in the quickstart
    fixed = parse_study(spec(search={**SEARCH, "params": {"moe.top_k": {"type": "int", "low": 1, "high": 12}},
                                     "constraints": ["moe.top_k <= moe.num_experts"]}))
    assert fixed.fixed_values == {"moe.num_experts": 8}
    assert sorted({p["moe.top_k"] for p in corner_points(fixed)}) == list(range(1, 9))


def test_a_relative_data_path_reaches_the_trials_absolute(tmp_path, monkeypatch):
    """The trials build their configs in Tune's working directories: a study's relative data.path is read from where
    the study is parsed, as `ercstudy train` reads it."""
    monkeypatch.chdir(tmp_path)
    study = parse_study(spec(base={**QUICKSTART["base"], "data": {"kind": "parquet", "path": "data/shards"}}))
    assert study.base["data"]["path"] == str(tmp_path / "data" / "shards")
    assert study.trial_config({}).data.path == str(tmp_path / "data" / "shards")
    monkeypatch.chdir("/")  # elsewhere, as a trial: the same path
    assert TrialConfig.from_dict(study.base).data.path == str(tmp_path / "data" / "shards")


def test_dry_run_lists_every_model_shape(capsys):
    assert main(["dry-run", "search_spaces/quickstart.yaml"]) == 0
    out = capsys.readouterr().out
    for n, k in [(4, 1), (4, 4), (8, 1), (8, 4)]:
        assert f"num_experts={n}, top_k={k}" in out
    assert "MFLOP/tok" in out and "mem/worker" in out and "trial(s) at once" in out


def test_dry_run_of_a_gpu_study_says_where_the_grouped_gemm_is_fast(capsys):
    from ercstudy.platform.study.dry_run import dry_run_lines

    gpu = plan_study(parse_study(spec(resources={"num_workers": 1, "gpus_per_worker": 1})))
    assert any("compute capability 9.x/10.x" in line for line in dry_run_lines(gpu, cpus=16, gpus=1))
    cpu = plan_study(parse_study(spec()))
    assert not any("compute capability" in line for line in dry_run_lines(cpu, cpus=2, gpus=0))


def test_a_study_asking_for_gpus_the_cluster_lacks_fails_fast():
    study = parse_study(spec(resources={"num_workers": 2, "gpus_per_worker": 1}))
    with pytest.raises(StudyError, match=r"a trial needs 2 GPU\(s\).*has 0"):
        concurrency(plan_study(study), Capacity(cpus=16, gpus=0, autoscaling=False))
    assert concurrency(plan_study(study), Capacity(cpus=16, gpus=8, autoscaling=True)) == 4  # min(8 // 2, num_trials 4)
    assert concurrency(plan_study(parse_study(QUICKSTART)), Capacity(cpus=2, gpus=0, autoscaling=False)) == 4  # half a CPU each


def test_a_study_whose_shards_ray_data_reads_leaves_it_a_cpu():
    """Ray Data lists and samples the files in one-CPU tasks: with every CPU held by trials they never run."""
    def study(reader):
        base = {**QUICKSTART["base"], "data": {"kind": "parquet", "path": "data/shards", "reader": reader}}
        return parse_study(spec(base=base, resources={"num_workers": 1, "cpus_per_worker": 1}))

    assert concurrency(plan_study(study("direct")), Capacity(cpus=2, gpus=0, autoscaling=False)) == 2
    assert concurrency(plan_study(study("ray_data")), Capacity(cpus=2, gpus=0, autoscaling=False)) == 1
    assert concurrency(plan_study(study("direct")), Capacity(cpus=1, gpus=0, autoscaling=False)) == 1
    with pytest.raises(StudyError, match=r"needs 1 CPU\(s\) and 1 left free for Ray Data's reads .*has 1"):
        concurrency(plan_study(study("ray_data")), Capacity(cpus=1, gpus=0, autoscaling=False))


def test_tracking_uri_and_unreachable_server(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(TrackingError, match="refuses plain file stores"):
        resolve_uri("./mlruns")
    (port,) = free_ports(1)
    with pytest.raises(TrackingError, match="cannot be reached"):
        check_reachable(f"http://127.0.0.1:{port}")
    # `ercstudy run` says so before starting Ray or any trial
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(QUICKSTART))
    assert main(["run", str(path), "--storage", str(tmp_path / "res")]) == 2
    assert "cannot be reached" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()  # refused before Ray and before the study directory


def test_power_law_fit_recovers_known_exponent():
    rng = np.random.default_rng(0)
    c = np.geomspace(1e15, 1e19, 12)
    for E, A, b in [(2.0, 3e3, 0.25), (1.5, 40.0, 0.1)]:
        loss = E + A * c**-b
        fit = fit_power_law(c, loss * (1 + 1e-4 * rng.standard_normal(len(c))))
        assert abs(fit.b - b) < 0.02 and abs(fit.E - E) < 0.05 * E, fit
        assert np.allclose(fit(c), loss, rtol=1e-3)
    with pytest.raises(ValueError, match=">= 4 points"):
        fit_power_law([1e15, 1e16, 1e17], [3, 2.5, 2.2])


def test_best_alpha_is_the_vertex_with_an_uncertainty():
    alpha = np.repeat([0.4, 0.6, 0.8, 1.0, 1.2], 3)
    rng = np.random.default_rng(1)
    loss = 2.0 + 0.5 * (alpha - 0.8) ** 2 + 0.002 * rng.standard_normal(len(alpha))
    a, err = best_alpha(alpha, loss)
    assert abs(a - 0.8) < 0.05 and 0 < err < 0.1
    assert best_alpha([0.5, 1.0], [2.0, 1.9]) == (1.0, pytest.approx(float("nan"), nan_ok=True))
    assert math.isclose(best_alpha(alpha, -loss, mode="max")[0], a)


def test_search_params_read_as_ranges_in_the_parent_run():
    params = parse_study(spec()).search.params
    assert {p: str(v) for p, v in params.items()} == {
        "erc.alpha": "float [0.5, 1.2]", "moe.num_experts": "categorical [4, 8]", "moe.top_k": "int [1, 4]",
        "train.lr": "float [0.0001, 0.003] log"}


def test_multi_objective_leaderboard_puts_the_pareto_front_first():
    study = parse_study(spec(objective=[{"metric": "eval/loss", "mode": "min"}, {"metric": "tokens_per_s", "mode": "max"}]))
    done = {"total_steps": 60, "step": 60}
    results = [  # (eval/loss, tokens/s): b and c trade off, a is dominated by b, d was stopped early, e failed
        ({**done, "trial_id": "a", "eval/loss": 3.0, "tokens_per_s": 900.0}, {}, None),
        ({**done, "trial_id": "b", "eval/loss": 2.5, "tokens_per_s": 1000.0}, {}, None),
        ({**done, "trial_id": "c", "eval/loss": 2.0, "tokens_per_s": 500.0}, {}, None),
        ({**done, "trial_id": "d", "step": 20, "eval/loss": 1.0, "tokens_per_s": 5000.0}, {}, None),
        ({**done, "trial_id": "e", "eval/loss": float("nan"), "tokens_per_s": 800.0}, {}, RuntimeError()),
    ]
    board = leaderboard(study, results)
    assert [(r["trial"], r["pareto"]) for r in board][:3] == [("c", True), ("b", True), ("a", False)]
    assert {r["trial"]: r["status"] for r in board[3:]} == {"d": "stopped_early", "e": "failed"}
    assert not any(r["pareto"] for r in board[3:])
    single = leaderboard(parse_study(spec()), results)
    assert [r["trial"] for r in single][:3] == ["c", "b", "a"] and "pareto" not in single[0]


def test_submit_validates_first_and_reports_an_unreachable_cluster_in_one_line(tmp_path, capsys):
    bad = tmp_path / "study.yaml"
    bad.write_text(yaml.safe_dump(spec(search={**SEARCH, "num_trials": 0})))
    (port,) = free_ports(1)
    assert main(["submit", str(bad), "--address", f"http://127.0.0.1:{port}"]) == 2
    assert "search.num_trials: must be >= 1" in capsys.readouterr().err
    assert main(["submit", "search_spaces/quickstart.yaml", "--address", f"http://127.0.0.1:{port}", "--storage", "/shared/results"]) == 2
    err = own_stderr(capsys.readouterr().err)
    assert err.startswith(f"ercstudy: error: could not submit to http://127.0.0.1:{port}") and "\n" not in err


@pytest.mark.ray
def test_a_study_refused_for_its_resources_leaves_no_parent_run_behind(ray_session, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    data = {**QUICKSTART, "name": "too-big", "resources": {"num_workers": 1, "gpus_per_worker": 1}}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data["tracking"] = {"uri": uri, "experiment": "too-big"}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--storage", str(tmp_path / "res")]) == 2
    assert "a trial needs 1 GPU(s)" in capsys.readouterr().err
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("too-big")
    assert exp is None or c.search_runs([exp.experiment_id]) == []
    assert not (tmp_path / "res" / "too-big").exists()


def test_a_study_too_big_for_every_gpu_type_the_cluster_names_is_refused_before_any_trial():
    """Ray names a node's GPUs in its resources (accelerator_type:<type>); the study's largest trial must fit the
    largest of them (devices.GPU_MEMORY_GIB), else one line before anything starts. Unknown types are left to the
    workers' own check."""
    from ercstudy.platform.cluster.capacity import gpu_types

    assert gpu_types({"GPU": 8.0, "accelerator_type:T4": 1.0}, {"accelerator_type:H100": 1.0, "CPU": 4}) == ("H100", "T4")
    big = spec(resources={"num_workers": 1, "gpus_per_worker": 1})
    big["base"]["model"].update(d_model=2048, n_layers=16, n_heads=16, seq_len=2048, vocab_size=32768)
    big["base"]["moe"].update(num_experts=64, expert_dim=1024)
    plan = plan_study(parse_study(big))
    need = max(plan.trial_config(p).memory_per_worker(gpu=True) for p in plan.corners) / 1e9
    assert 24 < need < 141, need  # between a T4's and an H200's
    with pytest.raises(StudyError, match=rf"largest trial needs about {need:.0f} GB .* hold at most 16 GB \(T4 \(16 GB\)\)"):
        concurrency(plan, Capacity(cpus=16, gpus=8, autoscaling=False, gpu_types=("T4",)))
    assert concurrency(plan, Capacity(cpus=16, gpus=8, autoscaling=False, gpu_types=("H200", "T4"))) >= 1  # fits an H200
    assert concurrency(plan, Capacity(cpus=16, gpus=8, autoscaling=False, gpu_types=("T4", "SOME-NEW-GPU"))) >= 1
    assert concurrency(plan, Capacity(cpus=16, gpus=8, autoscaling=False)) >= 1  # no type named: the workers check
