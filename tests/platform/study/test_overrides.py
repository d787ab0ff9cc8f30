"""Overrides on the command line (study/overrides.py): `ercstudy run STUDY.yaml base.erc.alpha=0.5 ...`, validated
exactly as the file is; and YAML numbers as researchers write them (`3e-4`, `1e5`, `.5`)."""

import pytest
import yaml

from ercstudy.platform.cli import main
from ercstudy.platform.study.overrides import apply_overrides, parse_override
from ercstudy.platform.study.spec import load_study
from ercstudy.trainables.config import load_yaml
from ercstudy.trainables.validation import ConfigError

QUICKSTART = "search_spaces/quickstart.yaml"


def test_values_are_read_as_yaml_and_paths_reach_dotted_keys():
    data = {"base": {"erc": {"alpha": 1.0}}, "search": {"params": {"erc.alpha": {"type": "float", "low": 0.5, "high": 1.0}}}}
    out = apply_overrides(data, ["base.erc.alpha=0.5", "search.params.erc.alpha.high=1.5", "base.moe.num_experts=[8, 16]",
                                 "search.params.moe.top_k={type: int, low: 1, high: 4}", "base.train.lr=3e-4"])
    assert out["base"]["erc"]["alpha"] == 0.5 and out["base"]["moe"]["num_experts"] == [8, 16]
    assert out["search"]["params"]["erc.alpha"]["high"] == 1.5  # the longest key that matches: the dotted param
    assert out["search"]["params"]["moe.top_k"] == {"type": "int", "low": 1, "high": 4}  # a new dotted param
    assert out["base"]["train"]["lr"] == pytest.approx(3e-4) and data["base"]["erc"]["alpha"] == 1.0  # a copy
    for bad in ("base.erc.alpha", "=1", "base..alpha=1"):
        with pytest.raises(ConfigError, match="expected dotted.key=value"):
            parse_override(bad)


def test_yaml_numbers_as_people_write_them():
    assert load_yaml("a: 3e-4\nb: 1E5\nc: .5\nd: -2.5e-3\ne: 10\nf: v1e5\ng: 1e\n") == {
        "a": 3e-4, "b": 1e5, "c": 0.5, "d": -2.5e-3, "e": 10, "f": "v1e5", "g": "1e"}


def test_a_study_with_exponent_floats_validates_with_those_values(tmp_path, capsys):
    spec = yaml.safe_load(open(QUICKSTART))
    spec["base"]["train"].update(lr="LR", warmup_steps="WARMUP")
    path = tmp_path / "floats.yaml"
    path.write_text(yaml.safe_dump(spec).replace("LR", "3e-4").replace("WARMUP", "1e1"))  # as a researcher writes them
    assert "lr: 3e-4" in path.read_text() and "warmup_steps: 1e1" in path.read_text()
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    cfg = load_study(path).base_config
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.warmup_steps == 10 and isinstance(cfg.train.warmup_steps, int)


def test_an_override_changes_what_dry_run_prints_and_a_mistyped_one_gets_the_suggestion(capsys):
    assert main(["dry-run", QUICKSTART]) == 0
    before = capsys.readouterr().out
    assert main(["dry-run", QUICKSTART, "search.num_trials=6", "search.repeats=2",
                 "scheduler.type=none"]) == 0
    after = capsys.readouterr().out
    assert "4 trials = (4 point(s)) x 1 seed(s)" in before and "12 trials = (6 point(s)) x 2 seed(s)" in after
    assert main(["validate", QUICKSTART, "base.erc.alpah=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ercstudy: error: base.erc.alpah") and "alpha" in err and "\n" not in err


def test_overrides_are_recorded_with_the_study():
    from ercstudy.platform.study.driver import spec_text

    study = load_study(QUICKSTART, ["base.erc.alpha=0.5"])
    assert study.overrides == ("base.erc.alpha=0.5",) and study.base_config.erc.alpha == 0.5
    text = spec_text(study)  # what the study's directory and its MLflow parent run keep
    assert text.startswith(f"# {QUICKSTART} with the overrides base.erc.alpha=0.5")
    assert yaml.safe_load(text)["base"]["erc"]["alpha"] == 0.5


def test_config_prints_a_file_that_validates_to_the_same_study(tmp_path, capsys):
    assert main(["config", QUICKSTART, "base.train.lr=3e-4", "search.num_trials=6"]) == 0
    resolved = capsys.readouterr().out
    path = tmp_path / "resolved.yaml"
    path.write_text(resolved)
    doc = yaml.safe_load(resolved)
    assert doc["base"]["train"]["lr"] == pytest.approx(3e-4) and doc["base"]["erc"]["router_grad"] is True  # defaults too
    assert main(["validate", str(path)]) == 0
    fed_back = capsys.readouterr().out
    assert "6 trials = (6 point(s)) x 1 seed(s)" in fed_back
    again = load_study(path)
    assert again.base_config == load_study(QUICKSTART, ["base.train.lr=3e-4"]).base_config
    assert main(["config", str(path)]) == 0 and yaml.safe_load(capsys.readouterr().out) == doc  # a fixed point
