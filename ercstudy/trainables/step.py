"""One optimizer step of a trial, top to bottom, and the per-step sums a report window keeps.

The step: for each micro-batch, forward, LM + load-balancing + z losses (+ the ERC loss once per
step), backward, DeepSpeed's step; the window sums what the reports need, on the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ercstudy.trainables.config import TrialConfig
from ercstudy.trainables.data import GlobalBatchStream
from ercstudy.trainables.engine import global_grad_norm
from ercstudy.trainables.erc import ACTIVATION_WEIGHTS, ERCResult, erc_loss
from ercstudy.trainables.evals import TrialEvaluator
from ercstudy.trainables.model import MoELM
from ercstudy.trainables.specialization import domain_expert_counts


@dataclass
class Trial:
    """Everything a worker holds while it trains."""

    cfg: TrialConfig
    engine: Any  # DeepSpeed's engine
    model: MoELM  # the parallelized model the engine wraps
    data: GlobalBatchStream
    device: torch.device
    rank: int
    world: int
    ep_group: Any
    erc_generator: torch.Generator
    evaluator: TrialEvaluator | None = None
    harness: Any = None  # harness.TrialHarness: lm-eval tasks at eval.harness.at steps (worker.make_trial)
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None  # the step a checkpoint restored, until the next report says so
    # a step's metrics whose evaluations are still to run: its checkpoint was saved before them (worker.train)
    unevaluated: dict[str, Any] | None = None
    checkpoints: Any = None  # checkpoint_writer.CheckpointSchedule: which reporting steps save (worker.make_trial)
    writer: Any = None  # checkpoint_writer.CheckpointWriter: reports and checkpoints to Ray Train (worker.setup_trial)


@dataclass
class Window:
    """Sums over the steps since the last report, kept on the device (no host sync per step)."""

    losses: Tensor  # [5]: lm, lb, z, erc, non-finite count
    grad_norm: Tensor  # [] global gradient norm (before clipping) of the window's last step
    tokens_per_expert: Tensor  # [L, n]
    dropped: Tensor  # [L]
    domain_counts: Tensor | None  # [L, domains, n]
    micro_batches: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)
    coupling: Tensor | None = None  # [L, n, n + 1] AoE's coupling sums (model.MoEAux.coupling); None when routed

    @classmethod
    def empty(cls, cfg: TrialConfig, device: torch.device, num_domains: int) -> Window:
        L, n = cfg.num_moe_layers, cfg.moe.num_experts
        domains = torch.zeros(L, num_domains, n, device=device) if num_domains else None
        zeros = partial(torch.zeros, device=device)
        coupling = zeros(L, n, n + 1) if cfg.moe.kind == "aoe" else None
        return cls(zeros(5), zeros(()).fill_(float("nan")), zeros(L, n), zeros(L), domains, coupling=coupling)


def coupling(model: Any, cfg: TrialConfig, ep_group: Any, *, generator: torch.Generator | None, clean: bool = False) -> ERCResult:
    """erc.erc_loss over every MoE layer of the (parallelized) model: noisy proxies and the trial's activation
    for the loss, the clean router rows (eps = 0) and the gate projections for the metrics. Under expert
    parallelism every rank computes the columns of M of its experts and the autograd-aware all-gather
    assembles M (parallelize.gather_columns)."""
    e = cfg.erc
    gather = None
    if ep_group is not None:
        from ercstudy.trainables.parallelize import gather_columns

        gather = partial(gather_columns, group=ep_group)
    # the metrics' clean M is the paper's (gate projections), comparable across an activation ablation's arms
    activation = "gate" if clean else e.activation
    weights = {name: model.expert_weights_of(name) for name in ACTIVATION_WEIGHTS[activation]}
    return erc_loss(
        model.router_weights(), weights, alpha=e.alpha, epsilon=0 if clean else e.epsilon,
        epsilon_scale=1.0 if clean else e.epsilon_scale, router_grad=e.router_grad, activation=activation,
        generator=generator, gather_columns=gather,
    )


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host batch onto the device without a host sync: pinned, then copied asynchronously."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def train_step(trial: Trial, window: Window, *, measure_grad_norm: bool) -> None:
    """One optimizer step: micro-batches, forward, LM + LB + z (+ ERC once), backward, step, metrics."""
    cfg, engine = trial.cfg, trial.engine
    accum = cfg.grad_accum
    for micro in range(accum):
        batch = trial.data.micro_batch(trial.step, micro)
        tokens = to_device(batch.tokens, trial.device)
        out = engine(tokens[:, :-1], tokens[:, 1:], return_logits=False)  # the LM head fused into the loss
        lb, z = out.aux.lb_loss.mean(), out.aux.z_loss.mean()
        loss = out.lm_loss + cfg.moe.lb_weight * lb + cfg.moe.z_weight * z
        erc = torch.zeros((), device=trial.device)
        if cfg.erc.enabled and micro == accum - 1:
            # Once per optimizer step: the ERC gradient depends on parameters only, which do not change
            # inside an accumulation window. DeepSpeed divides each micro-batch loss by `accum`: undo it.
            trial.erc_generator.manual_seed(cfg.train.seed * 1_000_003 + trial.step)  # same noise on every rank, and on resume
            per_layer = coupling(trial.model, cfg, trial.ep_group, generator=trial.erc_generator).loss
            erc = per_layer.mean() if cfg.erc.layer_reduction == "mean" else per_layer.sum()
            loss = loss + accum * cfg.erc.weight * erc
        if cfg.train.nan_at_step == trial.step:
            loss = loss * float("nan")
        engine.backward(loss)
        if measure_grad_norm and micro == accum - 1:
            # ZeRO keeps no .grad: then the report takes DeepSpeed's own norm
            window.grad_norm = global_grad_norm(trial.model, trial.ep_group, trial.device)
        engine.step()
        with torch.no_grad():
            window.losses += torch.stack([out.lm_loss, lb, z, erc, (~torch.isfinite(loss)).float()]).detach()
            window.tokens_per_expert += out.aux.tokens_per_expert
            window.dropped += out.aux.dropped_fraction
            if window.coupling is not None:
                window.coupling += out.aux.coupling
            if window.domain_counts is not None:
                window.domain_counts += domain_expert_counts(
                    out.aux.experts, to_device(batch.domains, trial.device), trial.data.num_domains, cfg.moe.num_experts
                )
            window.micro_batches += 1
    window.steps += 1
