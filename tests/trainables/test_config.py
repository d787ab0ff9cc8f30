"""Trial configs: built from dicts and YAML, with one-line errors that name the field."""

import pytest

from ercstudy.trainables.config import TrialConfig, load_trial_config
from ercstudy.trainables.validation import ConfigError


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict(data)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_round_trip_and_derived_sizes():
    cfg = TrialConfig.from_dict({"moe": {"num_experts": 4, "top_k": 2}, "erc": {"epsilon": 0.1}, "train": {"tokens": 65536}})
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.erc.epsilon == 0.1 and TrialConfig.from_dict({"erc": {"epsilon": "auto"}}).erc.epsilon == "auto"
    assert cfg.steps == 65536 // (32 * 128)
    assert cfg.grad_accum == 4


@pytest.mark.parametrize(
    "data,expected",
    [
        ({"moe": {"num_experts": 4, "top_k": 5}}, "moe.top_k: must be <= num_experts (4), got 5"),
        ({"moe": {"top_kk": 2}}, "moe.top_kk: unknown key (did you mean 'top_k'?)"),
        ({"modle": {}}, "modle: unknown key (did you mean 'model'?)"),
        ({"erc": {"alpha": -1}}, "erc.alpha: must be >= 0 (a finite number), got -1"),
        ({"erc": {"epsilon": "bound"}}, "erc.epsilon: must be float or 'auto', got 'bound'"),
        ({"model": {"d_model": "big"}}, "model.d_model: must be an integer, got 'big'"),
        ({"model": {"d_model": 100, "n_heads": 3}}, "model.n_heads: must divide d_model (100), got 3"),
        ({"moe": {"backend": "megablocks"}}, "moe.backend: must be one of 'grouped', 'deepspeed', got 'megablocks'"),
        ({"moe": {"moe_every": 9}}, "moe.moe_every: must be <= model.n_layers (4)"),
        ({"resources": {"num_workers": 2, "ep_size": 4}}, "resources.ep_size: must divide num_workers (2), got 4"),
        ({"train": {"global_batch_size": 12}}, "train.global_batch_size: must be a multiple of"),
        ({"model": {"vocab_size": 10}}, "model.vocab_size: must be >= the synthetic corpus vocabulary"),
        ({"train": {"zero_stage": 3}}, "train.zero_stage: must be 0, 1 or 2"),
        ({"resources": {"num_workers": 2}, "train": {"micro_batch_size": 4}, "eval": {"sequences": 1}},
         "eval.sequences: must be a multiple of resources.num_workers (2) so that every item is scored once"),
        ({"resources": {"num_workers": 4}, "train": {"micro_batch_size": 4}, "eval": {"sequences": 64, "mc_items": 30}},
         "eval.mc_items: must be a multiple of resources.num_workers (4)"),
    ],
)
def test_errors_name_the_field(data, expected):
    assert error_of(data).startswith(expected)


def test_yaml_files_study_base_and_syntax_errors(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("name: s\nbase:\n  moe:\n    num_experts: 4\n    top_k: 1\n")
    assert load_trial_config(study).moe.num_experts == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\n   n_layers: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line 3"):
        load_trial_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_trial_config(tmp_path / "missing.yaml")
    nested = tmp_path / "nested.yaml"
    nested.write_text("base:\n  moe:\n    top_k: 99\n")
    with pytest.raises(ConfigError, match=r"^base\.moe\.top_k: must be <= num_experts"):
        load_trial_config(nested)
