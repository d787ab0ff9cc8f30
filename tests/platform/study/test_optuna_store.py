"""The study's Optuna study in an RDB store (platform/study/optuna_store.py): optuna.db in the study's directory
(local) or a cached SQLite file copied to an object store (a real S3-compatible server) and fetched back on
resume; what optuna.load_study and optuna.importance read from it (platform/report/importance.py). No Ray: Tune's
calls are made by hand, as in test_search.py."""

import json
import math

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from ercstudy.platform.report.importance import (
    MIN_TRIALS,
    importance_lines,
    param_importances,
    target_quantile,
    top_count,
)
from ercstudy.platform.study.optuna_store import OptunaStore, read_study
from ercstudy.platform.study.plan import plan_study
from ercstudy.platform.study.search import build_search
from ercstudy.platform.study.spec import parse_study

QUICKSTART = yaml.safe_load(open("search_spaces/quickstart.yaml"))


def study_spec(num_trials=24, sampler="random"):
    data = yaml.safe_load(yaml.safe_dump(QUICKSTART))
    data["scheduler"] = {"type": "none"}
    data["search"].update(sampler=sampler, num_trials=num_trials)
    return parse_study(data)


def loss(params):
    """A synthetic objective that the learning rate decides (alpha and top_k barely matter)."""
    return 2.0 + 3.0 * (math.log10(params["train.lr"]) + 2.6) ** 2 + 0.001 * params["erc.alpha"]


def run_points(search, n, start=0):
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        config = search.suggest(f"t{i}")
        p = config["params"]
        search.on_trial_complete(f"t{i}", {"step": 60, "total_steps": 60, "eval/loss": loss(p),
                                           "alpha_star": 5.0 - 4.0 * p["erc.alpha"] + float(rng.normal(0, 0.01)),
                                           "eps_mean": 0.1 * p["moe.num_experts"]})


def test_local_storage_keeps_optuna_db_in_the_study_directory_and_resumes(tmp_path):
    study = study_spec()
    directory = tmp_path / "results" / study.name
    search = build_search(plan_study(study), str(directory))
    run_points(search, 3)
    assert (directory / "optuna.db").is_file()
    loaded = optuna.load_study(study_name=study.name, storage=f"sqlite:///{directory}/optuna.db")  # what the dashboard reads
    assert [t.state for t in loaded.trials] == [TrialState.COMPLETE] * 3
    assert set(loaded.trials[0].user_attrs) == {"alpha_star", "eps_mean"}
    search.suggest("t3")  # asked, still running when the driver stops
    search.save(str(tmp_path / "searcher.pkl"))
    restored = build_search(plan_study(study), str(directory))
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("t3", {"step": 60, "total_steps": 60, "eval/loss": 2.5})  # the running trial is told
    run_points(restored, 2, start=4)
    states = [t.state for t in optuna.load_study(study_name=study.name, storage=f"sqlite:///{directory}/optuna.db").trials]
    assert states == [TrialState.COMPLETE] * 6


def test_a_trial_told_before_a_driver_kill_reports_again_after_resume_without_error(tmp_path):
    """The driver was killed after optuna.db had the trial's end and before Tune saved the searcher: the resumed
    trial says its last result again (a report, then its completion); optuna.db keeps the end it has."""
    data = yaml.safe_load(yaml.safe_dump(QUICKSTART))
    data["search"].update(sampler="random", num_trials=4)  # ASHA on: single-objective reports go to Optuna
    study = parse_study(data)
    directory = tmp_path / "results" / study.name
    search = build_search(plan_study(study), str(directory))
    search.suggest("t0")
    search.save(str(tmp_path / "searcher.pkl"))  # Tune's last save: t0 still running
    search.on_trial_complete("t0", {"step": 60, "total_steps": 60, "eval/loss": 2.5})  # told; then the kill
    restored = build_search(plan_study(study), str(directory))
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("t0", {"step": 60, "total_steps": 60, "eval/loss": 2.5, "resumed_from_step": 60})
    restored.on_trial_complete("t0", {"step": 60, "total_steps": 60, "eval/loss": 2.5})
    trials = optuna.load_study(study_name=study.name, storage=f"sqlite:///{directory}/optuna.db").trials
    assert [(t.state, t.value) for t in trials] == [(TrialState.COMPLETE, 2.5)]


def test_remote_storage_copies_the_cache_to_the_bucket_and_fetches_it_on_resume(bucket, tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-a"))
    study = study_spec()
    directory = f"{bucket}/studies/{study.name}"
    search = build_search(plan_study(study), directory)
    run_points(search, 2)
    fs, path = pafs.FileSystem.from_uri(f"{directory}/optuna.db")
    assert fs.get_file_info(path).type == pafs.FileType.File  # copied at each point told
    assert str(OptunaStore(directory).local).startswith(str(tmp_path / "cache-a"))
    search.save(str(tmp_path / "searcher.pkl"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-b"))  # resumed on another machine: an empty cache
    restored = build_search(plan_study(study), directory)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert [t.number for t in restored.optuna_study.get_trials()] == [0, 1]
    run_points(restored, 1, start=2)
    with read_study(directory, study.name) as s:
        assert [t.state for t in s.trials] == [TrialState.COMPLETE] * 3
    with read_study(f"{bucket}/studies/none", study.name) as s:
        assert s is None


def test_importances_find_the_param_that_matters_and_refuse_too_few_points(tmp_path):
    study = study_spec(num_trials=40)
    directory = tmp_path / study.name
    search = build_search(plan_study(study), str(directory))
    run_points(search, MIN_TRIALS - 1)
    with read_study(str(directory), study.name) as s:
        lines, _ = importance_lines(study, s, where="x")
    assert len([line for line in lines if line]) == 2 and "Too few completed points" in lines[-1], lines
    run_points(search, 1, start=MIN_TRIALS - 1)
    with read_study(str(directory), study.name) as s:
        lines, _ = importance_lines(study, s, where="x")
    # the smallest study: the best set is 2 points, not Optuna's top 10% (one point), and says it is indicative
    assert any(f"over {MIN_TRIALS} completed points (PED-ANOVA: the best 2 points against all" in line
               and "Indicative only" in line for line in lines), lines
    run_points(search, 40 - MIN_TRIALS, start=MIN_TRIALS)
    with read_study(str(directory), study.name) as s:
        imp = param_importances(study, s.get_trials())
        lines, _ = importance_lines(study, s, where="sqlite:///x")
    objective, alpha_star, eps = imp["eval/loss (low)"], imp["alpha* (low)"], imp["eps (high)"]
    # moe.top_k is asked under narrowed names (moe.top_k|1..4): here it is one param
    assert set(objective) == {"erc.alpha", "moe.num_experts", "moe.top_k", "train.lr"}
    assert max(objective, key=objective.get) == "train.lr"
    assert max(alpha_star, key=alpha_star.get) == "erc.alpha" and max(eps, key=eps.get) == "moe.num_experts"
    assert "| param | eval/loss (low) | alpha* (low) | eps (high) |" in lines
    assert param_importances(study, s.get_trials()) == imp  # deterministic


@pytest.mark.parametrize("n", [MIN_TRIALS, 7, 19, 20, 21, 40, 55, 1000])
def test_the_best_set_is_optunas_ten_percent_but_never_below_two_points(n):
    from optuna.importance._ped_anova.evaluator import _QuantileFilter  # what PED-ANOVA keeps as the best set

    rng = np.random.default_rng(n)
    trials = [optuna.trial.create_trial(value=float(v)) for v in rng.permutation(n)]
    kept = _QuantileFilter(target_quantile(n), True, None).filter(trials)
    assert len(kept) == top_count(n) == max(2, math.ceil(n / 10))
    assert sorted(t.value for t in kept) == list(range(top_count(n)))


def test_without_a_store_there_is_one_line():
    lines, _ = importance_lines(study_spec(), None, where="/nowhere/optuna.db")
    assert [line for line in lines if line][-1].startswith("No Optuna store")


def test_a_point_with_seeds_records_the_mean_of_alpha_star(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(QUICKSTART))
    data["scheduler"] = {"type": "none"}
    data["search"] = {**data["search"], "params": {"erc.alpha": [0.5]}, "sampler": "grid", "num_trials": 1, "repeats": 2,
                      "constraints": []}
    study = parse_study(data)
    search = build_search(plan_study(study), str(tmp_path / "s"))
    for tid, a in (("a", 1.0), ("b", 2.0)):
        search.suggest(tid)
        search.on_trial_complete(tid, {"step": 60, "total_steps": 60, "eval/loss": 3.0, "alpha_star": a})
    (t,) = search.optuna_study.get_trials()
    assert t.user_attrs == {"alpha_star": pytest.approx(1.5)} and t.state == TrialState.COMPLETE


def test_a_database_url_is_written_down_without_its_password():
    from ercstudy.platform.study.optuna_store import without_password

    assert without_password("postgresql://optuna:s3cr:et@db.example:5432/optuna") == "postgresql://optuna:***@db.example:5432/optuna"
    assert without_password("postgresql://optuna@db.example/optuna") == "postgresql://optuna@db.example/optuna"


def test_a_study_whose_optuna_study_is_in_a_database_needs_its_url_to_resume_or_report(tmp_path, monkeypatch, capsys):
    """optuna.json says where the Optuna study lives; without ERCSTUDY_OPTUNA_DB, resume and report say so in one line,
    exit 2, before anything starts (the database itself: tests/integration/test_tracking_server.py)."""
    from ercstudy.platform.cli import main
    from ercstudy.platform.study.optuna_store import DATABASE_ENV, MARKER, OptunaStoreError

    directory = tmp_path / "studies" / "s"
    directory.mkdir(parents=True)
    (directory / MARKER).write_text('{"database": "postgresql://optuna:***@db/optuna"}')
    (directory / "study.yaml").write_text(yaml.safe_dump({**QUICKSTART, "name": "s"}))
    (directory / "study.json").write_text(json.dumps({"name": "s", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                                      "experiment_id": "1", "parent_run_id": "r"}))
    monkeypatch.delenv(DATABASE_ENV, raising=False)
    store = OptunaStore(str(directory))
    assert store.in_database and store.study_name("s") == f"s@{directory}"
    with pytest.raises(OptunaStoreError, match=f"set {DATABASE_ENV} to that database's URL"):
        store.check()
    for command in (["resume", "s"], ["report", "s"]):
        assert main([*command, "--storage", str(tmp_path / "studies")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and DATABASE_ENV in err[0], err


def test_a_study_whose_optuna_database_does_not_answer_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    from ercstudy.netutil import free_port
    from ercstudy.platform.cli import main
    from ercstudy.platform.study.optuna_store import DATABASE_ENV

    monkeypatch.setenv(DATABASE_ENV, f"postgresql://optuna:s3cret@127.0.0.1:{free_port()}/optuna")  # nothing listens
    monkeypatch.chdir(tmp_path)
    assert main(["run", "quickstart", "--storage", str(tmp_path / "studies")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ercstudy: error: {DATABASE_ENV}=postgresql://optuna:***@127.0.0.1:"), err
    assert "s3cret" not in err[0] and not (tmp_path / "studies").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_study_in_postgresql_resumes_and_no_pickle_holds_the_password(postgres, tmp_path, monkeypatch):
    """A real PostgreSQL (ERCSTUDY_OPTUNA_DB): the study is made there as NAME@DIRECTORY, the searcher's save and any
    pickle of it (Tune's tuner.pkl pickles the searcher when the Tuner is made) hold its name and trial ids, never the
    URL's password, and a restored searcher carries on in the same Optuna study."""
    import pickle

    from postgres_server import PASSWORD

    from ercstudy.platform.study.optuna_store import DATABASE_ENV, OptunaStore

    monkeypatch.setenv(DATABASE_ENV, postgres.create_database("optuna_resume"))
    study = study_spec()
    directory = tmp_path / "results" / study.name
    directory.mkdir(parents=True)
    search = build_search(plan_study(study), str(directory))
    run_points(search, 2)
    search.suggest("t2")  # running when the driver stops
    assert not (directory / "optuna.db").exists() and OptunaStore(str(directory)).in_database
    search.save(str(tmp_path / "searcher.pkl"))
    for blob in ((tmp_path / "searcher.pkl").read_bytes(), pickle.dumps(search), (directory / "optuna.json").read_bytes()):
        assert PASSWORD.encode() not in blob
    restored = pickle.loads(pickle.dumps(search))  # as `ercstudy resume`: the searcher from tuner.pkl, then its state
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.optuna_study.study_name == f"{study.name}@{directory}"
    restored.on_trial_complete("t2", {"step": 60, "total_steps": 60, "eval/loss": 2.5})
    run_points(restored, 1, start=3)
    with read_study(str(directory), study.name) as s:
        assert [t.state for t in s.trials] == [TrialState.COMPLETE] * 4
