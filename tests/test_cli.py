"""`ercstudy train` refuses bad input with one line and exit status 2, before starting Ray."""

import pytest

from ercstudy.platform.cli import describe, main
from ercstudy.trainables.config import load_trial_config


@pytest.mark.parametrize(
    "text,expected",
    [
        ("base:\n  moe: {num_experts: 4, top_k: 8}\n", "base.moe.top_k: must be <= num_experts (4), got 8"),
        ("model:\n  d_model: 64\n   n_layers: 2\n", "YAML syntax error at line 3"),
        ("erc: {alpha: -0.5}\n", "erc.alpha: must be >= 0"),
    ],
)
def test_config_errors_are_one_line_with_exit_status_2(tmp_path, capsys, text, expected):
    path = tmp_path / "trial.yaml"
    path.write_text(text)
    assert main(["train", str(path), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ercstudy: error: ") and expected in err and "\n" not in err


def test_missing_file_and_existing_run(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "runs" / "quick").mkdir(parents=True)
    path = tmp_path / "quick.yaml"
    path.write_text("model: {d_model: 64}\n")
    assert main(["train", str(path), "--storage", str(tmp_path / "runs")]) == 2
    assert "already exists" in capsys.readouterr().err and "--resume" not in str(path)


def test_quickstart_config_is_valid_and_tiny():
    cfg = load_trial_config("search_spaces/quickstart.yaml")
    assert cfg.erc.enabled and cfg.num_params() < 1_000_000 and cfg.steps == 60
    assert "MoE: 8 experts, top-2" in describe(cfg)
