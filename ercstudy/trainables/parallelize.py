"""Parallelism applied to the single-device model: the MoE layers of the trial's backend and expert-parallel size.

The model (model.py, moe.py) is built as single-device code with GroupedMoE layers. `parallelize`
then swaps each of them, weights included, for the layer the trial trains with:
- backend `deepspeed`: `DeepSpeedMoE`, deepspeed.moe.layer.MoE with our SwiGLU expert and router,
  holding this rank's n / ep_size experts. Same parameters and routing as moe.GroupedMoE, held the
  way DeepSpeed wants them: the router is the gate's `wg` Linear, each expert is its own module
  (DeepSpeed deep-copies the one it is given, tags its parameters `allreduce=False` and
  `group_name="ep_size_N"`, and shards them over the expert-parallel group that the engine creates
  at deepspeed.initialize). Capacity and token dropping follow DeepSpeed's TopKGate; with
  drop_tokens=False the capacity is the busiest expert's load and nothing is dropped.
- backend `grouped` with ep_size > 1: `GroupedEPMoE`, the grouped (dropless) layer with its experts
  split over an expert-parallel group. It is a deepspeed.moe.layer.MoE to the engine, so DeepSpeed
  does what it does for its own MoE layers: creates the expert-parallel and expert-data-parallel
  groups, reduces expert gradients over the expert-data-parallel group, keeps expert parameters in
  their own ZeRO groups and writes one checkpoint file per global expert.
- backend `grouped` with ep_size 1: the layer stays as built.

Every rank builds the whole model from the same seed and keeps its slice of the experts, so global
expert j starts the same whatever the split. Checkpoints name expert weights the way DeepSpeed's
MoE checkpoints do (`...deepspeed_moe.experts.deepspeed_experts.<e>.gate`, one tensor per expert);
expert_keys.py turns those names back into the single-device model's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from ercstudy.trainables import private_apis
from ercstudy.trainables.expert_keys import stack_expert_keys, unstack_expert_keys
from ercstudy.trainables.moe import (
    GroupedExperts,
    GroupedMoE,
    MoEConfig,
    MoEStats,
    count_per_expert,
    route,
    routing_losses,
)


class SwiGLUExpert(nn.Module):
    """One expert: (silu(x @ gate) * (x @ up)) @ down, with gate/up [d, D] and down [D, d]."""

    def __init__(self, d_model: int, expert_dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(d_model, expert_dim))
        self.up = nn.Parameter(torch.empty(d_model, expert_dim))
        self.down = nn.Parameter(torch.empty(expert_dim, d_model))

    def forward(self, x: Tensor) -> Tensor:
        return (F.silu(x @ self.gate) * (x @ self.up)) @ self.down


class DeepSpeedMoE(nn.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, *, ep_size: int = 1):
        super().__init__()
        self.cfg, self.ep_size = cfg, ep_size
        self.moe = MoE(
            hidden_size=d_model,
            expert=SwiGLUExpert(d_model, cfg.expert_dim),
            num_experts=cfg.num_experts,
            ep_size=ep_size,
            k=cfg.top_k,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.capacity_factor,
            min_capacity=0,
            drop_tokens=cfg.drop_tokens,
            use_rts=False,  # random token selection would make the two backends differ
            top2_2nd_expert_sampling=False,  # no Gumbel noise on the second expert: plain top-k
        )

    @property
    def _experts(self) -> list[SwiGLUExpert]:
        return list(self.moe.deepspeed_moe.experts.deepspeed_experts)

    @property
    def router_weight(self) -> Tensor:  # [n, d]
        return self.moe.deepspeed_moe.gate.wg.weight

    @property
    def ep_group(self) -> Any:
        """The expert-parallel process group (set by the engine at deepspeed.initialize; None before)."""
        return getattr(self.moe.deepspeed_moe, "ep_group", None)

    @property
    def gate_weight(self) -> Tensor:  # [n_local, d, D]
        return torch.stack([e.gate for e in self._experts])

    def expert_weights(self) -> dict[str, Tensor]:
        """router [n, d]; gate/up [n_local, d, D]; down [n_local, D, d] (stacked copies of the experts' parameters)."""
        experts = self._experts
        return {
            "router": self.router_weight,
            **{name: torch.stack([getattr(e, name) for e in experts]) for name in ("gate", "up", "down")},
        }

    @torch.no_grad()
    def load_expert_weights(self, weights: dict[str, Tensor]) -> None:
        """router [n, d]; gate/up/down of this rank's n_local experts."""
        self.router_weight.copy_(weights["router"])
        for i, expert in enumerate(self._experts):
            for name in ("gate", "up", "down"):
                getattr(expert, name).copy_(weights[name][i])

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        out, _, _ = self.moe(x)
        # DeepSpeed keeps its logits to itself: recompute the routing (a [T, d] x [d, n] matmul)
        # for the auxiliary losses and the metrics. Its own l_aux is not used: for k = 2 it
        # counts first choices only, so the two backends would optimise different LB losses.
        x_TD = x.reshape(-1, x.shape[-1])
        routing = route(x_TD, self.router_weight, self.cfg.top_k)
        tokens_per_expert_E = count_per_expert(routing.experts_TK, self.cfg.num_experts)
        lb_loss, z_loss = routing_losses(routing, tokens_per_expert_E)
        stats = MoEStats(
            lb_loss=lb_loss,
            z_loss=z_loss,
            tokens_per_expert=tokens_per_expert_E,
            dropped_fraction=self._dropped_fraction(tokens_per_expert_E, x_TD.shape[0]),
            experts_TK=routing.experts_TK,
        )
        return out.to(x.dtype), stats

    def _dropped_fraction(self, tokens_per_expert_E: Tensor, num_tokens: int) -> Tensor:
        if not self.cfg.drop_tokens:
            return tokens_per_expert_E.new_zeros(())
        k, n = self.cfg.top_k, self.cfg.num_experts
        # TopKGate's capacity: ceil(T / n * capacity_factor * k) for k > 1, * 1 for k = 1
        capacity = -(-num_tokens * self.cfg.capacity_factor * k // n)
        kept = tokens_per_expert_E.clamp_max(capacity).sum()
        return 1 - kept / (num_tokens * k)


class GroupedEPMoE(GroupedMoE, MoE):
    """The grouped backend's MoE with n / ep_size experts on each rank of an expert-parallel group.

    Forward on each rank: route its own tokens to all n experts (the router is replicated),
    sort the token copies by expert, send each rank the copies for its experts (all-to-all of
    the counts, then of the rows: one host sync for the split sizes), run the local experts as
    one grouped matmul per projection, send the outputs back (all-to-all), combine. Dropless,
    and the same function as GroupedMoE on one rank: only the order of rows in the matmuls
    differs. Rank r of the group holds global experts r * n_local .. (r + 1) * n_local - 1.
    """

    def __init__(self, cfg: MoEConfig, d_model: int, *, ep_size: int):
        GroupedMoE.__init__(self, cfg, d_model)
        self.experts = GroupedExperts(cfg.num_experts // ep_size, d_model, cfg.expert_dim)  # this rank's slice
        # what DeepSpeed's engine and checkpointing read of an MoE layer
        self.ep_size = ep_size
        self.num_local_experts = cfg.num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.enable_expert_tensor_parallelism = False
        self.ep_group = None  # set by the engine at deepspeed.initialize (set_deepspeed_parallelism)
        for param in self.experts.parameters():
            param.allreduce = False  # DeepSpeed's tags for expert parameters (deepspeed/moe/experts.py)
            param.group_name = self.expert_group_name
        # checkpoints: one tensor per expert under DeepSpeed's names, as DeepSpeed's MoE, and back on load
        self.register_state_dict_post_hook(unstack_expert_keys)
        self.register_load_state_dict_pre_hook(stack_expert_keys)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine at deepspeed.initialize, as for DeepSpeed's own MoE layers."""
        self.ep_group = private_apis.expert_parallel_group(self.ep_size, use_data_before_expert_parallel=use_data_before_expert_parallel_)

    def run_experts(self, x_SD: Tensor, tokens_per_expert_E: Tensor, weights_S: Tensor) -> Tensor:
        """As GroupedMoE.run_experts; the routing weights stay on this rank and scale the rows that come back."""
        if self.ep_group is None:
            raise RuntimeError("GroupedEPMoE: no expert-parallel group; build the DeepSpeed engine first (deepspeed.initialize)")
        from torch.distributed.nn.functional import all_to_all_single

        ep, n_local = self.ep_size, self.num_local_experts
        send_E = tokens_per_expert_E.to(torch.int64)  # copies this rank sends to each global expert
        recv_RE = torch.empty_like(send_E)
        dist.all_to_all_single(recv_RE, send_E, group=self.ep_group)  # [ep * n_local]: from rank r to my expert e
        recv_RE = recv_RE.view(ep, n_local)
        # the one host sync of the layer: the split sizes, which the all-to-alls take as Python ints
        send_splits, recv_splits = torch.stack([send_E.view(ep, n_local).sum(dim=1), recv_RE.sum(dim=1)]).tolist()
        received = sum(recv_splits)
        x_RD = all_to_all_single(x_SD.new_empty(received, x_SD.shape[-1]), x_SD, recv_splits, send_splits, group=self.ep_group)
        # rows arrive by source rank, each rank's rows sorted by expert: regroup them by local expert
        local_ids = torch.arange(n_local, device=x_SD.device).repeat(ep).repeat_interleave(recv_RE.reshape(-1), output_size=received)
        order = torch.argsort(local_ids, stable=True)
        y_RD = self.experts(x_RD[order], torch.cumsum(recv_RE.sum(dim=0), dim=0).to(torch.int32))
        y_RD = torch.empty_like(y_RD).index_copy_(0, order, y_RD)
        y_SD = all_to_all_single(y_RD.new_empty(x_SD.shape[0], y_RD.shape[-1]), y_RD, send_splits, recv_splits, group=self.ep_group)
        return y_SD * weights_S.unsqueeze(-1).to(y_SD.dtype)


# ---------------------------------------------------------------------------------------------
# Applying it


def moe_layer(cfg: MoEConfig, d_model: int, *, ep_size: int = 1) -> nn.Module:
    """The MoE layer of `cfg.backend` holding n / ep_size experts (uninitialised weights)."""
    if cfg.num_experts % ep_size:
        raise ValueError(f"moe.num_experts ({cfg.num_experts}) must be divisible by ep_size ({ep_size})")
    if cfg.backend == "deepspeed":
        return DeepSpeedMoE(cfg, d_model, ep_size=ep_size)
    if ep_size > 1:
        return GroupedEPMoE(cfg, d_model, ep_size=ep_size)
    return GroupedMoE(cfg, d_model)


def parallelize(model: nn.Module, cfg: MoEConfig, *, ep_size: int = 1, ep_rank: int = 0) -> nn.Module:
    """Swap every MoE layer of the single-device `model` (blocks[i].ffn, a GroupedMoE) for the layer of
    `cfg.backend` holding expert slice `ep_rank` of `ep_size`, with the same weights. In place; returns `model`.

    DeepSpeed's expert-parallel groups put consecutive ranks together: rank r holds slice r % ep_size.
    """
    n_local = cfg.num_experts // ep_size
    local = slice(ep_rank * n_local, (ep_rank + 1) * n_local)
    for block in model.blocks:
        if not block.is_moe or (cfg.backend == "grouped" and ep_size == 1):
            continue
        full = block.ffn.expert_weights()
        layer = moe_layer(cfg, full["router"].shape[-1], ep_size=ep_size)
        layer.load_expert_weights({k: v if k == "router" else v[local] for k, v in full.items()})
        block.ffn = layer
    return model


def expert_parallel_group(model: nn.Module) -> Any:
    """The expert-parallel process group of the model's MoE layers (None without expert parallelism)."""
    return next((g for layer in model.moe_layers if (g := getattr(layer, "ep_group", None)) is not None), None)


def gather_columns(m_local: Tensor, group: Any) -> Tensor:
    """Concatenate each expert-parallel rank's columns of M [..., n, n_local] -> [..., n, n].

    Autograd-aware all-gather: every rank computes the same loss from the same M, and its
    backward sums the ranks' gradients; DeepSpeed then divides expert gradients by the full
    data-parallel size, which makes the expert and router gradients exact.
    """
    if group is None or dist.get_world_size(group=group) == 1:
        return m_local
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(m_local, group=group), dim=-1)
