"""The trial config: the one contract between the control plane and the workers.

A frozen, validated dataclass tree with the sections model, moe, erc, train, data and
resources. Study params address it by dotted paths (`erc.alpha`, `moe.num_experts`).
A worker turns Ray's dict into it on its first line with `TrialConfig.from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ercstudy.trainables.data import DataConfig, check_data
from ercstudy.trainables.erc import ERCConfig
from ercstudy.trainables.evals import EvalConfig
from ercstudy.trainables.model import (
    ModelConfig,
    aoe_rank,
    flops_per_token,
    moe_layer_ids,
    num_active_params,
    num_params,
)
from ercstudy.trainables.moe import MoEConfig
from ercstudy.trainables.validation import ConfigError, from_dict, require, to_dict

CONFIG_KEY = "trial_config"  # train_loop_config[CONFIG_KEY]: the TrialConfig itself (Ray pickles it once)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The `train:` section: the optimisation recipe and the reporting cadence."""

    seed: int = 0  # init, the ERC noise and where the pass over the data starts
    tokens: int = 1_000_000  # training tokens; steps = tokens / (global_batch_size * seq_len)
    global_batch_size: int = 32  # sequences per optimizer step, over all workers
    micro_batch_size: int = 8  # sequences per worker per forward; the rest is gradient accumulation
    lr: float = 3e-3  # AdamW's peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup to lr, then cosine decay to lr x min_lr_ratio
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    beta1: float = 0.9  # AdamW's beta1
    beta2: float = 0.95  # AdamW's beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0-3)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    report_every: int = 10  # steps between ray.train.report calls (metrics)
    checkpoint_every: int | None = None  # steps between checkpoints (a multiple of report_every); None: by time
    checkpoint_minutes: float = 10.0  # without checkpoint_every: minutes of training between checkpoints
    async_checkpoint: bool = True  # save into host memory and write + upload behind the training step
    max_failures: int = 2  # worker-group restarts Ray Train may do (resuming from the last checkpoint)
    crash_at_step: int | None = None  # fault injection (tests): kill worker 0's process once, at this step
    crash_in: Literal["step", "eval"] = "step"  # where crash_at_step kills: its training, or its evaluations (after its checkpoint)
    nan_at_step: int | None = None  # fault injection (tests): make the loss NaN at this step

    def __post_init__(self) -> None:
        for name in ("tokens", "global_batch_size", "micro_batch_size", "report_every"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.checkpoint_every is None or self.checkpoint_every >= 1, "checkpoint_every",
                f"must be >= 1 (or unset: every checkpoint_minutes), got {self.checkpoint_every}")
        require(self.checkpoint_minutes >= 0, "checkpoint_minutes", f"must be >= 0, got {self.checkpoint_minutes}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        require(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        require(self.zero_stage in (0, 1, 2), "zero_stage", f"must be 0, 1 or 2 (DeepSpeed MoE refuses 3), got {self.zero_stage}")
        require(
            self.checkpoint_every is None or self.checkpoint_every % self.report_every == 0,
            "checkpoint_every",
            f"must be a multiple of report_every ({self.report_every}), got {self.checkpoint_every}",
        )
        require(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        require(not (self.precision == "bf16" and self.zero_stage == 2), "zero_stage",
                "2 accumulates gradients in bf16 under DeepSpeed 0.19; with bf16 use 0 or 1 (fp32 accumulation)")

    def bf16(self, device_type: str) -> bool:
        """Whether the trial trains in bf16 on a device of this type ("cuda", "cpu")."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")


@dataclass(frozen=True, kw_only=True)
class ResourcesConfig:
    """The `resources:` section: the Ray Train worker group of one trial."""

    num_workers: int = 1  # Ray Train workers (DeepSpeed ranks) of one trial
    cpus_per_worker: float = 1  # fractions share a core (tiny CPU trials, several at once)
    gpus_per_worker: int = 0  # GPUs each worker holds (0: CPU)
    ep_size: int = 1  # expert-parallel size: experts split over this many workers

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        require(self.gpus_per_worker >= 0, "gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        require(self.ep_size >= 1, "ep_size", f"must be >= 1, got {self.ep_size}")
        require(
            self.num_workers % self.ep_size == 0,
            "ep_size",
            f"must divide num_workers ({self.num_workers}), got {self.ep_size}",
        )


@dataclass(frozen=True, kw_only=True)
class TrialConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    erc: ERCConfig = field(default_factory=ERCConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self) -> None:
        model, moe, train, res = self.model, self.moe, self.train, self.resources
        require(
            moe.moe_every <= model.n_layers,
            "moe.moe_every",
            f"must be <= model.n_layers ({model.n_layers}) so that at least one block is MoE, got {moe.moe_every}",
        )
        require(
            moe.num_experts % res.ep_size == 0,
            "resources.ep_size",
            f"must divide moe.num_experts ({moe.num_experts}), got {res.ep_size}",
        )
        if moe.backend == "grouped":
            from ercstudy.trainables.moe import GROUPED_MM_ALIGN as align

            for path, width in (("model.d_model", model.d_model), ("moe.expert_dim", moe.expert_dim)):
                require(width % align == 0, path, f"must be a multiple of {align} for the grouped backend's grouped GEMM "
                        f"(16-byte rows in bf16), got {width}")
        require(
            not self.erc.enabled or moe.num_experts >= 2,
            "erc.enabled",
            "the ERC loss needs moe.num_experts >= 2",
        )
        require(not (self.erc.enabled and moe.kind == "aoe"), "erc.enabled",
                "ERC couples a router to its experts and moe.kind: aoe has none: set erc.enabled: false (AoE and ERC "
                "are the paper's two alternatives, compared as arms)")
        require(moe.kind == "routed" or res.ep_size == 1, "resources.ep_size",
                f"moe.kind: aoe runs every expert on one device (ep_size 1), got {res.ep_size}")
        require(not (train.precision == "auto" and res.gpus_per_worker > 0 and train.zero_stage == 2), "train.zero_stage",
                "2 accumulates gradients in bf16 under DeepSpeed 0.19, and precision auto is bf16 on GPU workers; use 0 or 1")
        per_step = train.micro_batch_size * res.num_workers
        require(
            train.global_batch_size % per_step == 0,
            "train.global_batch_size",
            f"must be a multiple of train.micro_batch_size x resources.num_workers ({per_step}), got {train.global_batch_size}",
        )
        if self.data.kind == "synthetic":
            require(
                self.data.synthetic_vocab <= model.vocab_size,
                "model.vocab_size",
                f"must be >= the synthetic corpus vocabulary ({self.data.synthetic_vocab}), got {model.vocab_size}",
            )
        require(
            train.crash_at_step is None or (train.checkpoint_every is not None and train.crash_at_step > train.checkpoint_every),
            "train.crash_at_step",
            f"must come after the first checkpoint (train.checkpoint_every set, now {train.checkpoint_every}) so that the trial can resume",
        )
        ev = self.eval
        scored = ("sequences", "mc_items") if self.data.kind == "synthetic" else ("sequences",)
        for name in scored:  # each worker scores rows rank, rank + workers, ...: the same number, none left out
            require(getattr(ev, name) % res.num_workers == 0, f"eval.{name}",
                    f"must be a multiple of resources.num_workers ({res.num_workers}) so that every item is scored "
                    f"once (0 = none), got {getattr(ev, name)}")
        require(
            ev.every % train.report_every == 0,
            "eval.every",
            f"must be a multiple of train.report_every ({train.report_every}), got {ev.every}",
        )
        if ev.harness.enabled:  # what needs no files; harness.check reads the tasks and their data before a run
            require(self.data.kind != "synthetic", "eval.harness.tasks",
                    "lm-eval tasks need a model with a text tokenizer, and the synthetic corpus has none: "
                    "train on text shards (data: {kind: parquet, path: ...} from `ercstudy prepare-data`)")
            require(ev.harness.at == "final" or ev.harness.at % train.report_every == 0, "eval.harness.at",
                    f"must be 'final' or a multiple of train.report_every ({train.report_every}), got {ev.harness.at}")
        if self.data.kind == "synthetic" and ev.mc_items:
            require(
                ev.mc_choices <= self.data.num_domains,
                "eval.mc_choices",
                f"must be <= data.num_domains ({self.data.num_domains}): each choice comes from another domain, got {ev.mc_choices}",
            )
            require(
                ev.mc_context + ev.mc_continuation <= model.seq_len + 1,
                "eval.mc_context",
                f"mc_context + mc_continuation must be <= model.seq_len + 1 ({model.seq_len + 1}), got {ev.mc_context + ev.mc_continuation}",
            )
        require(train.crash_in == "step" or (train.crash_at_step is not None and (
            train.crash_at_step == self.steps or (ev.every and train.crash_at_step % ev.every == 0))), "train.crash_in",
            f"eval needs train.crash_at_step ({train.crash_at_step}) at an evaluation: a multiple of eval.every ({ev.every}) or the last step ({self.steps})")
        for name in ("crash_at_step", "nan_at_step"):
            step = getattr(train, name)
            require(step is None or 1 <= step <= self.steps, f"train.{name}", f"must be in [1, {self.steps}], got {step}")

    # --- derived sizes --------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Optimizer steps: the token budget over the tokens of one global batch."""
        return max(1, self.train.tokens // (self.train.global_batch_size * self.model.seq_len))

    @property
    def trained_tokens(self) -> int:
        """Tokens the trial trains on: its steps x the sequences of a global batch x their length."""
        return self.steps * self.train.global_batch_size * self.model.seq_len

    @property
    def grad_accum(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.resources.num_workers)

    @property
    def num_moe_layers(self) -> int:
        return len(moe_layer_ids(self.model, self.moe))

    def num_params(self) -> int:
        return num_params(self.model, self.moe)

    def memory_per_worker(self, *, gpu: bool) -> float:
        """A rough upper estimate, in bytes, of one worker's memory: its model and optimizer state, plus activations.

        On GPU (bf16, DeepSpeed's BF16_Optimizer at ZeRO stage >= 1): bf16 weights and gradients, the fp32
        gradients it accumulates (unsharded), and the fp32 master weights and two Adam moments sharded over the
        data-parallel ranks: 20 bytes per parameter on one worker. On CPU (fp32): weights, gradients and the Adam
        moments, these sharded with ZeRO >= 1. Expert parameters are divided over ep_size. Activations per
        micro-batch as in Korthikanti et al. (2022), the MoE layers' expert activations scaled by top_k.
        """
        return self.state_memory(gpu=gpu) + self.activation_memory(gpu=gpu)

    def state_memory(self, *, gpu: bool) -> float:
        """Bytes of one worker's parameters, gradients and optimizer state (memory_per_worker)."""
        m, moe, res = self.model, self.moe, self.resources
        expert = moe.num_experts * 3 * m.d_model * moe.expert_dim * self.num_moe_layers
        local = self.num_params() - expert + expert / res.ep_size
        if gpu:
            return (2 + 2 + 4) * local + (4 + 8) * local / res.num_workers
        return (4 + 4) * local + 8 * local / (res.num_workers if self.train.zero_stage >= 1 else 1)

    def activation_memory(self, *, gpu: bool) -> float:
        """Bytes of one micro-batch's activations (memory_per_worker)."""
        m, moe = self.model, self.moe
        act_bytes = 2 if gpu else 4
        tokens = self.train.micro_batch_size * m.seq_len
        attn = tokens * m.d_model * (34 + 5 * m.n_heads * m.seq_len / m.d_model) * act_bytes / 2
        experts = tokens * moe.top_k * moe.expert_dim * 3 * act_bytes
        if moe.kind == "aoe":  # every expert's pre-computed low-rank activation of every token, kept for backward
            experts += tokens * moe.num_experts * aoe_rank(m, moe) * act_bytes
        return m.n_layers * attn + self.num_moe_layers * experts

    def num_active_params(self) -> int:
        return num_active_params(self.model, self.moe)

    def flops_per_token(self) -> float:
        return flops_per_token(self.model, self.moe)

    def check_data(self) -> Any:
        """data.check_data for this trial: its Parquet shards fit the model, the batch and the eval set (DataError)."""
        return check_data(self.data, vocab_size=self.model.vocab_size, seq_len=self.model.seq_len,
                          global_batch=self.train.global_batch_size, eval_sequences=self.eval.sequences)

    # --- conversion -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> TrialConfig:
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def yaml_loader() -> Any:
    """PyYAML's safe loader, reading numbers as people write them: `3e-4`, `1E5`, `.5` are floats (YAML 1.2's
    rule; PyYAML follows YAML 1.1, where a float needs a dot and `3e-4` is a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
        [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
    return Loader


def load_yaml(text: str) -> Any:
    """YAML text as Python values (numbers as people write them: yaml_loader); the one place ercstudy parses YAML."""
    import yaml

    return yaml.load(text, Loader=yaml_loader())


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file or a syntax error is a ConfigError naming the file (and line)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"{path}: no such file")
    try:
        return load_yaml(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError("", f"{path}: YAML syntax error{where}: {problem}") from None


def load_trial_config(path: str | Path) -> TrialConfig:
    """A trial config file, or a study file whose `base:` section is one."""
    return trial_config_of(read_yaml(path), source=str(path))


def trial_config_of(data: Any, *, source: str) -> TrialConfig:
    """The trial config of a parsed file: the file itself, or a study file's `base:` section."""
    if isinstance(data, dict) and "base" in data:
        try:
            return from_dict(TrialConfig, data["base"], prefix="base")
        except ConfigError as err:
            raise ConfigError(err.path, f"{err.reason} (in {source})") from None
    try:
        return TrialConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(err.path, f"{err.reason} (in {source})") from None
