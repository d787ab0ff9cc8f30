"""Mixture-of-Experts feed-forward: a softmax top-k router and SwiGLU experts, two compute backends.

Shape legend: T tokens, d model width, n experts, k experts per token, D expert width,
S = T * k routed (token, slot) pairs.

Both backends hold the same parameters (router [n, d]; per expert gate [d, D], up [d, D],
down [D, d]) and route the same way (DeepSpeed-MoE's convention):
  1. logits_TE = x_TD @ router^T (in the parameters' dtype, kept as float32); probs_TE = softmax(logits) in float32
  2. the top-k experts per token; their probabilities are renormalised to sum to 1 when
     k > 1 (for k = 1 the raw probability is the weight, so the router still learns)
  3. y_T = sum over the k slots of weight * SwiGLU_expert(x_T) (the weight scales the [D]-wide hidden row
     before the down projection, where it is cheapest)
  4. load-balancing loss n * sum_e mean_T(probs[:, e]) * f_e (f_e = share of the S
     assignments that chose e), and router z-loss mean_T(logsumexp(logits)^2)

- `grouped` (default, dropless): sort the S pairs by expert, run one grouped matmul for gate and up
  together and one for down (torch.nn.functional.grouped_mm), unsort and sum the k weighted slots.
  No per-expert Python loop.
- `deepspeed`: deepspeed.moe.layer.MoE (GShard-style capacity and token dropping).

This file is single-device code: the model is built with GroupedMoE layers, and
parallelize.py swaps in the layer of the trial's backend and expert-parallel size (DeepSpeed's
MoE, or GroupedEPMoE whose sorted pairs travel to the rank holding their expert and back).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ercstudy.trainables.validation import require

if not hasattr(F, "grouped_mm"):
    raise ImportError(f"ercstudy needs torch >= 2.11 (torch.nn.functional.grouped_mm); this is torch {torch.__version__}")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The `moe:` section of a trial config."""

    num_experts: int = 8  # experts per MoE layer (n)
    top_k: int = 2  # experts each token is routed to
    expert_dim: int = 256  # D, the hidden width of each SwiGLU expert
    moe_every: int = 1  # every k-th block is an MoE block (1 = all, as in OLMoE); the others are dense
    dense_dim: int | None = None  # hidden width of the dense blocks' SwiGLU (default: top_k * expert_dim)
    backend: Literal["grouped", "deepspeed"] = "grouped"  # grouped: dropless grouped GEMMs (default); deepspeed: DeepSpeed-MoE's TopKGate with capacity
    lb_weight: float = 0.01  # load-balancing loss coefficient
    z_weight: float = 0.001  # router z-loss coefficient
    capacity_factor: float = 1.0  # deepspeed backend: expert capacity = factor * T * k / n
    drop_tokens: bool = False  # deepspeed backend: drop tokens over capacity (False = dropless, like grouped)
    # routed: a softmax router chooses each token's experts; aoe: the experts choose themselves by the norm of their own
    # low-rank gate activation, with no router (Autonomy-of-Experts, trainables/aoe.py)
    kind: Literal["routed", "aoe"] = "routed"
    aoe_rank: int | None = None  # aoe: the rank of each expert's factorized gate (default: the routed layer's parameters)

    def __post_init__(self) -> None:
        require(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        require(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        require(
            self.top_k <= self.num_experts,
            "top_k",
            f"must be <= num_experts ({self.num_experts}), got {self.top_k}",
        )
        require(self.expert_dim >= 1, "expert_dim", f"must be >= 1, got {self.expert_dim}")
        require(self.moe_every >= 1, "moe_every", f"must be >= 1, got {self.moe_every}")
        require(self.dense_dim is None or self.dense_dim >= 1, "dense_dim", f"must be >= 1, got {self.dense_dim}")
        require(self.lb_weight >= 0, "lb_weight", f"must be >= 0, got {self.lb_weight}")
        require(self.z_weight >= 0, "z_weight", f"must be >= 0, got {self.z_weight}")
        require(self.capacity_factor > 0, "capacity_factor", f"must be > 0, got {self.capacity_factor}")
        require(self.kind == "routed" or self.backend == "grouped", "kind", "aoe runs on the grouped backend (backend: grouped)")
        require(self.aoe_rank is None or (self.aoe_rank >= GROUPED_MM_ALIGN and self.aoe_rank % GROUPED_MM_ALIGN == 0),
                "aoe_rank", f"must be a multiple of {GROUPED_MM_ALIGN} (the grouped GEMM's rows), got {self.aoe_rank}")

    @property
    def dense_hidden(self) -> int:
        return self.dense_dim if self.dense_dim is not None else self.top_k * self.expert_dim


@dataclass(frozen=True)
class MoEStats:
    """What one MoE layer reports besides its output: the auxiliary losses and its routing."""

    lb_loss: Tensor  # [] load-balancing loss
    z_loss: Tensor  # [] router z-loss
    tokens_per_expert: Tensor  # [n] float32, routed (token, slot) pairs per expert before any drop
    dropped_fraction: Tensor  # [] share of the S pairs dropped for capacity (0 when dropless)
    experts_TK: Tensor  # [T, k] int64, the chosen experts, for specialization metrics
    # AoE only: [n, n + 1] per first-chosen expert i, the summed activation norms of every expert j on its tokens, and
    # (last column) how many tokens: the coupling matrix of an AoE layer, measured on its own activations (aoe.py)
    coupling_sums: Tensor | None = None


@dataclass(frozen=True)
class Routing:
    weights_TK: Tensor  # [T, k] float32 combine weights
    experts_TK: Tensor  # [T, k] int64
    probs_TE: Tensor  # [T, n] float32
    logits_TE: Tensor  # [T, n] float32


def router_logits(x_TD: Tensor, router_ED: Tensor) -> Tensor:
    """x W^T [T, n] in float32, from operands as the trial holds them: on CUDA with bf16 operands one bf16 GEMM with
    fp32 accumulation and an fp32 output (no fp32 copy of the activations, no bf16 rounding of the logits);
    elsewhere an fp32 GEMM (the router is n columns wide: a few percent of the expert GEMMs' FLOPs)."""
    if x_TD.device.type == "cuda" and x_TD.dtype == router_ED.dtype == torch.bfloat16:
        return torch.mm(x_TD, router_ED.T, out_dtype=torch.float32)
    return F.linear(x_TD.float(), router_ED.float())


def route(x_TD: Tensor, router_ED: Tensor, top_k: int) -> Routing:
    """Softmax top-k routing (DeepSpeed-MoE's convention, see the module docstring).

    The logits, softmax and top-k are float32, and so is the router GEMM's output: rounding the logits to bf16
    first would move near-ties between experts (DeepSpeed's gate routes in fp32 too). See router_logits.
    """
    return topk_routing(router_logits(x_TD, router_ED), top_k)


def topk_routing(logits_TE: Tensor, top_k: int) -> Routing:
    """The routing that float32 logits [T, n] choose: softmax, the top-k experts, their probabilities renormalised
    to sum to one when k > 1 (the routed layer's logits are the router's; AoE's the norms of its activations)."""
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TK, experts_TK = torch.topk(probs_TE, top_k, dim=-1)
    if top_k > 1:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
    return Routing(weights_TK, experts_TK, probs_TE, logits_TE)


def routing_losses(routing: Routing, tokens_per_expert_E: Tensor) -> tuple[Tensor, Tensor]:
    """(load-balancing loss, z-loss) of one layer's routing."""
    num_tokens, n = routing.probs_TE.shape
    k = routing.experts_TK.shape[-1]
    share_E = tokens_per_expert_E / (num_tokens * k)  # f_e, no gradient (counts)
    lb_loss = n * (routing.probs_TE.mean(dim=0) * share_E).sum()
    z_loss = torch.logsumexp(routing.logits_TE, dim=-1).square().mean()
    return lb_loss, z_loss


def count_per_expert(experts: Tensor, num_experts: int) -> Tensor:
    """Histogram of expert ids (any shape) -> [n] float32, without a host sync (unlike bincount on CUDA)."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, device=flat.device, dtype=torch.float32).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float32)
    )


GROUPED_MM_ALIGN = 8  # elements: torch's grouped GEMM needs 16-byte row strides, 8 bf16 values (4 fp32)
_fallback_warned: set[str] = set()


def grouped_mm_unsupported(x: Tensor, w: Tensor) -> str | None:
    """Why torch.nn.functional.grouped_mm cannot take these operands (None when it can).

    On CUDA it runs bf16 on compute capability >= 8.0 (A100, H100, ...); on CPU any float dtype.
    Both need rows whose byte strides are multiples of 16.
    """
    if x.dtype != w.dtype:
        return f"operands of different dtypes ({x.dtype}, {w.dtype})"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{x.dtype} operands (it takes float32, bfloat16 and float16)"
    if any(s * x.element_size() % 16 for s in (x.shape[-1], w.shape[-1])):
        return f"row widths {x.shape[-1]} and {w.shape[-1]} are not multiples of {16 // x.element_size()} {x.dtype} values"
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16:
            return f"{x.dtype} on CUDA (the CUDA kernel takes bf16: train.precision bf16)"
        major, minor = torch.cuda.get_device_capability(x.device)
        if major < 8:
            return f"compute capability {major}.{minor} (needs >= 8.0)"
    return None


def grouped_mm_fast_path(device: torch.device) -> bool:
    """Whether torch's grouped GEMM has its fused kernel on `device`: compute capability 9.x / 10.x (H100, H200,
    B200). Elsewhere (A100, L40S, L4, ...) torch runs it as a loop over the groups with a host synchronisation per
    call; on CPU it is a loop too, which costs nothing extra there."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def _warn_once(reason: str, message: str) -> None:
    if reason not in _fallback_warned:
        _fallback_warned.add(reason)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def grouped_mm(x_SK: Tensor, w_EKN: Tensor, offsets_E: Tensor) -> Tensor:
    """Rows of x_SK sorted by group; group e (rows offsets[e-1]:offsets[e]) times w_EKN[e]. -> [S, N].

    torch.nn.functional.grouped_mm where it runs. Otherwise a per-group loop (the reference path,
    with a host sync and a Python loop over experts), with a warning, once per reason, saying why.
    """
    reason = grouped_mm_unsupported(x_SK, w_EKN)
    if reason is None:
        if not grouped_mm_fast_path(x_SK.device):
            name = torch.cuda.get_device_name(x_SK.device)
            _warn_once(name, f"grouped MoE: {name} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(x_SK.device)))}) "
                             "has no fused grouped GEMM in torch: it loops over the experts with a host sync per MoE layer "
                             "(several times slower than on an H100/H200); backend: deepspeed may be faster there")
        return F.grouped_mm(x_SK, w_EKN, offs=offsets_E)
    _warn_once(reason, f"grouped MoE: torch.nn.functional.grouped_mm cannot run on {reason}; falling back to a slow per-expert loop")
    ends = offsets_E.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([x_SK[s:e] @ w_EKN[g] for g, (s, e) in enumerate(zip(starts, ends))], dim=0)


class _GateUpHalves(torch.autograd.Function):
    """gate_up [n, d, 2D] -> (gate_up, its gate half, its up half) as one autograd node, whose backward adds the
    halves' gradients (the ERC loss's) into gate_up's own gradient (the expert GEMM's) in place.

    Read as plain slices, each half's gradient would become a full-size zero tensor [n, d, 2D] with the half
    copied in, then summed with gate_up's gradient: at the paper's 3B shape (n 64, d 1536, D 768, bf16) about
    1 GB of memory traffic per layer per step, against 0.45 GB here."""

    @staticmethod
    def forward(ctx: Any, gate_up: Tensor, expert_dim: int) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        ctx.expert_dim, ctx.shape = expert_dim, gate_up.shape
        return gate_up.view_as(gate_up), gate_up[..., :expert_dim], gate_up[..., expert_dim:]

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, grad_gate: Tensor | None, grad_up: Tensor | None) -> tuple[Tensor | None, None]:
        if grad_gate is None and grad_up is None:
            return grad, None
        # grad is the expert GEMM's fresh gradient, which nothing else reads: add into it
        grad = (grad_gate if grad_gate is not None else grad_up).new_zeros(ctx.shape) if grad is None else grad.contiguous()
        if grad_gate is not None:
            grad[..., : ctx.expert_dim] += grad_gate
        if grad_up is not None:
            grad[..., ctx.expert_dim :] += grad_up
        return grad, None


class GroupedExperts(nn.Module):
    """n SwiGLU experts with stacked weights: gate and up as one gate_up [n, d, 2D] (one grouped GEMM reads
    each token copy once for both), down [n, D, d]. `gate` and `up` are views of gate_up's two halves: under
    autograd, those of the last forward (_GateUpHalves: the ERC loss reads them without a full-size gradient)."""

    def __init__(self, num_experts: int, d_model: int, expert_dim: int):
        super().__init__()
        self.expert_dim = expert_dim
        self.gate_up = nn.Parameter(torch.empty(num_experts, d_model, 2 * expert_dim))
        self.down = nn.Parameter(torch.empty(num_experts, expert_dim, d_model))
        self._halves: tuple[Tensor, Tensor] | None = None  # the last forward's gate and up, under autograd

    def _half(self, i: int) -> Tensor:
        if self._halves is not None and torch.is_grad_enabled():
            return self._halves[i]
        return self.gate_up[..., : self.expert_dim] if i == 0 else self.gate_up[..., self.expert_dim :]

    @property
    def gate(self) -> Tensor:  # [n, d, D], a view of gate_up
        return self._half(0)

    @property
    def up(self) -> Tensor:  # [n, d, D], a view of gate_up
        return self._half(1)

    def forward(self, x_SD: Tensor, offsets_E: Tensor, row_scale_S: Tensor | None = None) -> Tensor:
        """x_SD: token copies sorted by expert; offsets_E: int32 cumulative counts; row_scale_S: a factor per
        copy (its routing weight), applied to the [S, D] hidden rows before the down projection. -> [S, d]."""
        gate_up, self._halves = self.gate_up, None
        if torch.is_grad_enabled() and gate_up.requires_grad:
            gate_up, *halves = _GateUpHalves.apply(gate_up, self.expert_dim)
            self._halves = (halves[0], halves[1])
        gate_SF, up_SF = grouped_mm(x_SD, gate_up, offsets_E).chunk(2, dim=-1)
        h_SF = F.silu(gate_SF) * up_SF
        if row_scale_S is not None:
            h_SF = h_SF * row_scale_S.unsqueeze(-1).to(h_SF.dtype)
        return grouped_mm(h_SF, self.down, offsets_E)


class GroupedMoE(nn.Module):
    """Dropless MoE: sort token copies by expert, one grouped matmul per projection.

    Single-device: the router and all n experts. Expert parallelism is applied from outside
    (parallelize.py swaps in a subclass whose `run_experts` sends token copies to other ranks).
    """

    def __init__(self, cfg: MoEConfig, d_model: int):
        nn.Module.__init__(self)  # explicit: parallelize.GroupedEPMoE also derives from DeepSpeed's MoE, whose __init__ is not wanted
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = nn.Parameter(torch.empty(cfg.num_experts, d_model))  # [n, d]
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.expert_dim)

    @property
    def router_weight(self) -> Tensor:  # [n, d]
        return self.router

    @property
    def gate_weight(self) -> Tensor:  # [n, d, D]
        return self.experts.gate

    def expert_weights(self) -> dict[str, Tensor]:
        """The backend-independent parameter set: router [n, d], gate/up [n, d, D] (views of gate_up), down [n, D, d]."""
        return {"router": self.router, "gate": self.experts.gate, "up": self.experts.up, "down": self.experts.down}

    @torch.no_grad()
    def load_expert_weights(self, weights: dict[str, Tensor]) -> None:
        for name, param in self.expert_weights().items():
            param.copy_(weights[name])

    def run_experts(self, x_SD: Tensor, tokens_per_expert_E: Tensor, weights_S: Tensor) -> Tensor:
        """Token copies sorted by expert [S, d], the count per expert [n] and each copy's routing weight [S]
        -> the weighted expert outputs [S, d]."""
        return self.experts(x_SD, torch.cumsum(tokens_per_expert_E, dim=0).to(torch.int32), weights_S)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        num_tokens, k = x_TD.shape[0], self.top_k
        # 1. route
        routing = route(x_TD, self.router, k)
        tokens_per_expert_E = count_per_expert(routing.experts_TK, self.num_experts)
        # 2. sort the S = T * k (token, slot) pairs by expert
        order_S = torch.argsort(routing.experts_TK.reshape(-1), stable=True)
        x_SD = x_TD[order_S // k]
        # 3. experts: gate_up and down as one grouped matmul each, the routing weight applied to the hidden rows
        y_SD = self.run_experts(x_SD, tokens_per_expert_E, routing.weights_TK.reshape(-1)[order_S])
        # 4. unsort the weighted copies and sum each token's k slots. Deliberately not a scatter-add into [T, d]:
        # CUDA's index_add_ is atomic (run-to-run nondeterministic, and k bf16 roundings a row); this sum is
        # deterministic and rounds once (fp32 accumulation), at the cost of one [S, d] pass.
        y_TKD = torch.empty_like(y_SD).index_copy_(0, order_S, y_SD).view(num_tokens, k, -1)
        out = y_TKD.sum(dim=1).to(x.dtype).view(shape)
        lb_loss, z_loss = routing_losses(routing, tokens_per_expert_E)
        stats = MoEStats(lb_loss, z_loss, tokens_per_expert_E, x.new_zeros((), dtype=torch.float32), routing.experts_TK)
        return out, stats


def random_expert_weights(
    num_experts: int, d_model: int, expert_dim: int, *, std: float, out_std: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Normal init of a full layer (all n experts): router and gate/up with `std`, down with `out_std`.

    The whole layer is drawn on every rank, so that global expert j starts the same whatever the
    expert-parallel split (parallelize.py then keeps each rank's slice).
    """
    n, d, D = num_experts, d_model, expert_dim

    def normal(*shape: int, s: float) -> Tensor:
        return torch.randn(*shape, generator=generator) * s

    return {"router": normal(n, d, s=std), "gate": normal(n, d, D, s=std), "up": normal(n, d, D, s=std), "down": normal(n, D, d, s=out_std)}
