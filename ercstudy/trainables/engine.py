"""The DeepSpeed engine of a trial: its config from the trial config, and the model built under it.

`build_engine` builds the single-device model, applies expert parallelism (parallelize.py) and
hands it to deepspeed.initialize on the current process group (Ray Train's, or any other).
DeepSpeed is imported inside it, so that the driver, which only names the worker function,
never loads DeepSpeed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ercstudy.trainables import private_apis
from ercstudy.trainables.config import TrialConfig
from ercstudy.trainables.model import MoELM


def deepspeed_config(cfg: TrialConfig, *, bf16: bool) -> dict[str, Any]:
    """DeepSpeed's config for the trial. In bf16 the engine keeps fp32 master weights, accumulates and
    all-reduces gradients in fp32, and clips by the norm of every gradient, experts included: DeepSpeed's
    BF16_Optimizer, which it picks for ZeRO stage 1 with `grad_accum_dtype: fp32` (stage 0 runs as 1:
    with a torch optimizer, DeepSpeed 0.19's stage 0 bf16 path accumulates in bf16 and leaves expert
    gradients out of the clipping norm; stage 1 also shards the fp32 state over data-parallel ranks)."""
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": max(t.zero_stage, 1) if bf16 else t.zero_stage},
        "bf16": {"enabled": bf16},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        # torch_adam: the torch AdamW, not DeepSpeed's JIT-built CPU/CUDA Adam (50 s of compilation on CPU, a CUDA
        # toolchain on GPU); fused: its one-kernel implementation over the fp32 masters (CUDA and CPU alike), in place
        # of a loop of per-parameter kernels
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8, "weight_decay": t.weight_decay, "torch_adam": True,
                       "fused": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": cfg.steps,
                # DeepSpeed refuses 0 warm-up steps: 0 means one (its first step then runs at lr 0)
                "warmup_num_steps": max(1, min(t.warmup_steps, cfg.steps)),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": t.min_lr_ratio,
            },
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every forward and step; the report measures tokens/s
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms); DeepSpeed splits the expert parameters out."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


@dataclass
class BuiltEngine:
    """What a worker trains with: DeepSpeed's engine, the (parallelized) model it wraps, and the
    expert-parallel group (None without expert parallelism)."""

    deepspeed: Any  # the DeepSpeed engine
    model: MoELM
    ep_group: Any


class _SchedulerNotStarted(logging.Filter):
    """DeepSpeed's engine asks its LR scheduler for a learning rate while building itself, before the
    first step, and WarmupCosineLR warns about exactly that once per engine: a warning no user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "before it has started" not in record.getMessage()


def build_engine(cfg: TrialConfig, device: torch.device, *, rank: int) -> BuiltEngine:
    """The model and its DeepSpeed engine on the current process group."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from ercstudy.trainables.parallelize import (  # imports DeepSpeed: only where an engine is built
        expert_parallel_group,
        parallelize,
    )

    if device.type == "cuda":  # before any allocation: a trial too large for its GPU fails with the numbers, not an OOM
        props = torch.cuda.get_device_properties(device)
        check_fits(cfg, props.total_memory, props.name)
    if device.type == "cpu":
        private_apis.skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")  # reuses Ray's process group
    ep = cfg.resources.ep_size
    model = parallelize(MoELM(cfg.model, cfg.moe, seed=cfg.train.seed), cfg.moe, ep_size=ep, ep_rank=rank % ep)
    bf16 = cfg.train.bf16(device.type)
    if not any(isinstance(f, _SchedulerNotStarted) for f in ds_logger.filters):
        ds_logger.addFilter(_SchedulerNotStarted())
    engine, *_ = deepspeed.initialize(
        args=deepspeed_args(device), model=model, model_parameters=param_groups(model, cfg.train.weight_decay),
        config=deepspeed_config(cfg, bf16=bf16),
    )
    return BuiltEngine(engine, model, expert_parallel_group(model))


def check_fits(cfg: TrialConfig, total_bytes: int, gpu_name: str) -> None:
    """Refuse a trial whose worker cannot fit its GPU (TrialConfig.memory_per_worker's estimate), in one line."""
    need = cfg.memory_per_worker(gpu=True)
    if need > total_bytes:
        raise ValueError(f"resources: a worker of this trial needs about {need / 2**30:.1f} GiB (model, optimizer state and "
                         f"activations, bf16), its GPU ({gpu_name}) has {total_bytes / 2**30:.1f} GiB: raise resources.ep_size "
                         f"or num_workers, or lower train.micro_batch_size (ercstudy dry-run shows mem/worker)")


def deepspeed_args(device: torch.device) -> Any:
    """The one device of a worker, for DeepSpeed too: left to itself it takes cuda:LOCAL_RANK, which is not the
    worker's GPU when a worker holds several (gpus_per_worker >= 2: Ray Train's get_device() is its first GPU among
    the node's visible ones), and the model would train on one GPU while batches and the ERC noise go to another."""
    import types

    return types.SimpleNamespace(device_rank=device.index) if device.type == "cuda" and device.index is not None else None


def global_grad_norm(model: torch.nn.Module, ep_group: Any, device: torch.device) -> Tensor:
    """L2 norm of all gradients after DeepSpeed's all-reduce, before clipping (expert shards summed over EP)."""
    from deepspeed.moe.utils import is_moe_param

    dense, expert = torch.zeros((), device=device), torch.zeros((), device=device)
    for p in model.parameters():
        if p.grad is not None:
            sq = p.grad.detach().float().square().sum()
            if is_moe_param(p):
                expert += sq
            else:
                dense += sq
    if ep_group is not None:
        dist.all_reduce(expert, group=ep_group)
    return (dense + expert).sqrt()
