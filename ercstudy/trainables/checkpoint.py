"""A trial's checkpoints outside training: what they hold, and the trained model loaded from one.

A checkpoint is the directory Ray Train keeps for a `ray.train.report(..., checkpoint=...)`:

    checkpoint_<time>/ds/mp_rank_00_model_states.pt        DeepSpeed: dense weights, client state
    checkpoint_<time>/ds/layer_<l>_expert_<e>_mp_rank_00_model_states.pt   (deepspeed MoE backend:
                                                            one file per global expert, any ep_size)
    checkpoint_<time>/trial_config.yaml                     the resolved trial config
    checkpoint_<time>/tokenizer.json                        the text tokenizer (Parquet data only)

Loading needs no process group: the single-device model is built (for the deepspeed backend,
parallelized with ep_size 1, whose local expert ids are global ones) and DeepSpeed's per-expert
files are merged into its state dict (expert_keys.py maps their names).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ercstudy.trainables.config import TrialConfig, load_trial_config
from ercstudy.trainables.shards import TOKENIZER_FILE, read_file
from ercstudy.trainables.validation import ConfigError

CHECKPOINT_TAG = "ds"
CONFIG_FILE = "trial_config.yaml"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: the message is one line that says why."""


def save(directory: str | Path, engine: Any, cfg: TrialConfig, *, step: int, history: list[dict[str, Any]], rank: int,
         unevaluated: dict[str, Any] | None = None) -> None:
    """Every rank writes its DeepSpeed shard (a collective); rank 0 adds the config and tokenizer.
    `unevaluated`: the step's metrics when the checkpoint is saved before the step's evaluations."""
    client_state = {"step": step, "history": history, "unevaluated": unevaluated}
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state=client_state)
    if rank == 0:
        write_extras(directory, cfg)


def write_extras(directory: str | Path, cfg: TrialConfig) -> None:
    """What makes a checkpoint usable on its own: the trial config, and the tokenizer of text data."""
    import yaml

    directory = Path(directory)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if cfg.data.kind == "parquet":
        tokenizer = read_file(cfg.data.path, TOKENIZER_FILE)  # beside the shards: a directory or a URI (s3://...)
        if tokenizer is not None:
            (directory / TOKENIZER_FILE).write_bytes(tokenizer)


def newest(names: Iterable[str]) -> str | None:
    """The newest of a Train run directory's checkpoint names: Ray Train names them by time
    (checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff>), so the newest sorts last."""
    return max((n for n in names if n.startswith("checkpoint_")), default=None)


def not_a_checkpoint(path: str | Path) -> CheckpointError:
    return CheckpointError(f"{path}: neither a checkpoint (no {CHECKPOINT_TAG}/ inside) nor a run directory holding checkpoint_*/")


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a Train run directory (its newest checkpoint). Local paths only: a checkpoint
    on remote storage is copied here first (platform/cluster/storage.py)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (p / CHECKPOINT_TAG).is_dir():
        return p
    found = newest(c.name for c in p.glob("checkpoint_*") if (c / CHECKPOINT_TAG).is_dir())
    if found is None:
        raise not_a_checkpoint(path)
    return p / found


@dataclass
class LoadedCheckpoint:
    path: Path
    cfg: TrialConfig
    model: Any  # MoELM, in eval mode
    step: int
    tokenizer: Any | None  # tokenizers.Tokenizer, None for the synthetic corpus


def _safe_load(file: Path) -> Any:
    """torch.load with weights_only=True: tensors, containers and plain values, never arbitrary objects. A
    checkpoint is a file someone else may have written; unpickling anything else could run their code."""
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("\n")[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{file}: refused: it holds Python objects other than tensors and plain data, which "
                              f"loading would have to execute ({reason[:200]})") from None


def load(path: str | Path, *, config: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """The trained model of a checkpoint (its config from the checkpoint, else from `config`)."""
    from ercstudy.trainables.expert_keys import single_device_state_dict
    from ercstudy.trainables.model import MoELM

    ckpt = resolve(path)
    config_file = Path(config) if config else ckpt / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{ckpt}: no {CONFIG_FILE} (checkpoints from before it was saved): pass the trial's config with --config")
    try:
        cfg = load_trial_config(config_file)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    tag_dir = ckpt / CHECKPOINT_TAG
    states = _safe_load(tag_dir / "mp_rank_00_model_states.pt")
    state = dict(states["module"])
    for expert_file in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(_safe_load(expert_file))
    model = MoELM(cfg.model, cfg.moe, seed=cfg.train.seed)
    if cfg.moe.backend == "deepspeed":  # DeepSpeed's layer (capacity, dropping) at eval too; imports DeepSpeed
        from ercstudy.trainables.parallelize import parallelize

        parallelize(model, cfg.moe)
    missing, unexpected = model.load_state_dict(single_device_state_dict(state, cfg.moe), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not fit the trial config {config_file} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    tokenizer = None
    for candidate in (ckpt / TOKENIZER_FILE, Path(cfg.data.path or ".") / TOKENIZER_FILE if cfg.data.kind == "parquet" else None):
        if candidate is not None and candidate.is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(candidate))
            break
    step = int(states.get("step", (states.get("client_state") or {}).get("step", 0)) or 0)
    return LoadedCheckpoint(ckpt, cfg, model, step, tokenizer)
