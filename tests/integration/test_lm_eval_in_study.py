"""lm-eval tasks inside a study (`eval.harness`): the refusals before anything starts, relative paths, a failed
evaluation that the trial survives, the paper's suite preset. A study whose trials run the tasks end to end (and
rank by a harness metric): tests/integration/test_study_seeds_run.py, which shares its trials with the seeds and arms.
"""

import copy
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES, own_stderr

pytest.importorskip("lm_eval", reason="the `evals` extra (lm-evaluation-harness) is not installed")

TASKS = FIXTURES / "harness" / "tasks"
DATA_DIR = FIXTURES / "harness"
STEPS = 8
OBJECTIVE = "harness/tiny_passages/bits_per_byte"


def spec(shards, name: str = "harness_tiny") -> dict:
    return {
        "name": name,
        "base": {
            "model": {"vocab_size": 320, "d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
            "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
            "erc": {"enabled": True, "alpha": 1.0},
            "train": {"seed": 3, "tokens": STEPS * 8 * 32, "global_batch_size": 8, "micro_batch_size": 8, "lr": 0.01,
                      "warmup_steps": 2, "report_every": 4, "checkpoint_every": 8},
            "data": {"kind": "parquet", "path": str(shards)},
            "eval": {"sequences": 8, "harness": {"tasks": ["tiny_next_line", "tiny_passages"], "include_path": str(TASKS),
                                                 "data_dir": str(DATA_DIR), "at": "final", "limit": 4, "batch_size": 16}},
        },
        "search": {"sampler": "grid", "num_trials": 2, "seed": 0, "params": {"train.lr": [0.01, 0.0003]}},
        "objective": {"metric": OBJECTIVE, "mode": "min"},
        "scheduler": {"type": "none"},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }


# ---------------------------------------------------------------------------------------------
# Before anything starts


def refused(tmp_path, capsys, data: dict) -> str:
    from ercstudy.platform.cli import main

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--storage", str(tmp_path / "results")]) == 2
    err = own_stderr(capsys.readouterr().err)
    assert err.startswith("ercstudy: error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "results").exists()  # refused before any storage, tracking or Ray
    return err


def test_a_missing_task_file_a_synthetic_corpus_and_a_bad_objective_are_refused_up_front(shards, tmp_path, capsys):
    empty = tmp_path / "nodata"
    empty.mkdir()
    data = spec(shards)
    data["base"]["eval"]["harness"]["data_dir"] = str(empty)
    err = refused(tmp_path, capsys, data)
    assert "base.eval.harness.tasks: tiny_next_line: its data file" in err and str(empty / "data" / "next_line.jsonl") in err, err

    data = spec(shards)
    data["base"]["data"] = {"kind": "synthetic"}
    assert "base.eval.harness.tasks: lm-eval tasks need a model with a text tokenizer" in refused(tmp_path, capsys, data)

    data = spec(shards)
    data["base"]["eval"]["harness"]["include_path"] = str(tmp_path / "nowhere")
    assert "base.eval.harness.include_path" in refused(tmp_path, capsys, data)

    data = spec(shards)
    data["objective"] = {"metric": "harness/tiny_passages/bit_per_byte", "mode": "min"}
    assert f"did you mean {OBJECTIVE!r}" in refused(tmp_path, capsys, data)

    data = spec(shards)
    data["scheduler"] = {"type": "asha", "grace_period": 4}
    assert "scheduler.type: asha compares trials" in refused(tmp_path, capsys, data)

    data = spec(shards)
    data["base"]["eval"]["harness"]["at"] = 6
    assert "base.eval.harness.at: must be 'final' or a multiple of train.report_every (4), got 6" in refused(tmp_path, capsys, data)


def test_relative_harness_paths_are_read_from_where_the_study_starts(shards, tmp_path, monkeypatch):
    from ercstudy.platform.study.spec import parse_study

    data = spec(shards)
    data["base"]["eval"]["harness"].update(include_path="tasks", data_dir=None)
    monkeypatch.chdir(DATA_DIR)
    harness = parse_study(copy.deepcopy(data)).base_config.eval.harness
    assert harness.include_path == str(TASKS) and harness.data_dir == str(DATA_DIR)


def test_a_failed_evaluation_is_the_evaluations_reason_on_the_run_not_the_trials(shards, tmp_path):
    """Files gone after validation: the evaluation reports why; the trial's report goes on."""
    import shutil

    import torch
    from mlflow.tracking import MlflowClient

    from ercstudy.platform.tracking import client as tracking
    from ercstudy.trainables import reports
    from ercstudy.trainables.config import TrialConfig
    from ercstudy.trainables.lm_eval_adapter import FAILED_METRIC, TrialHarness
    from ercstudy.trainables.model import MoELM

    moved = tmp_path / "harness"
    shutil.copytree(DATA_DIR, moved)
    base = spec(shards)["base"]
    base["eval"]["harness"].update(include_path=str(moved / "tasks"), data_dir=str(moved))
    cfg = TrialConfig.from_dict(base)
    shutil.rmtree(moved / "data")
    model = MoELM(cfg.model, cfg.moe, seed=0)
    out = TrialHarness(cfg, rank=0, device=torch.device("cpu"))(model, STEPS)
    assert out[FAILED_METRIC] == 1.0 and "next_line.jsonl" in out[reports.HARNESS_ERROR] and model.training
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = c.create_run(c.create_experiment("failed")).info.run_id
    tracking.log_result(c, run_id, {"step": STEPS, "lm_loss": 5.0, **out})
    run = c.get_run(run_id)
    assert run.data.tags[tracking.HARNESS_TAG].startswith(f"failed at step {STEPS}: ") and run.data.metrics[FAILED_METRIC] == 1.0


def test_the_paper_suite_preset_validates_once_its_ten_local_copies_exist_and_names_the_missing_one(shards, tmp_path):
    from ercstudy.platform.study.spec import parse_study
    from ercstudy.trainables.lm_eval_adapter import data_files, leaf_configs, task_manager
    from ercstudy.trainables.validation import ConfigError

    repo = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((repo / "search_spaces" / "paper_suite.yaml").read_text())
    harness = data["base"]["eval"]["harness"]
    assert len(harness["tasks"]) == 10
    manager = task_manager(harness["tasks"], str(repo / "evals" / "tasks"))
    files = [f for t in harness["tasks"] for cfg in leaf_configs(manager, t) for f in data_files(cfg)]
    assert len(files) == 11 and all(f.startswith("data/") for f in files)  # MMLU: test and dev
    for task in harness["tasks"]:  # each says how its copy is made
        assert "load_dataset(" in (repo / "evals" / "tasks" / f"{task}.yaml").read_text(), task
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    data["base"]["data"]["path"] = str(shards)
    harness.update(include_path=str(repo / "evals" / "tasks"), data_dir=str(tmp_path))
    study = parse_study(copy.deepcopy(data))
    assert study.objective.metric == "harness/hellaswag_local/acc_norm"
    (tmp_path / "data" / "winogrande" / "validation.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"base\.eval\.harness\.tasks: winogrande_local: its data file .*validation\.jsonl"):
        parse_study(copy.deepcopy(data))
