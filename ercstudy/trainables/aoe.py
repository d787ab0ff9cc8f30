"""Autonomy-of-Experts (AoE; Lv et al., "Autonomy-of-Experts Models", arXiv 2501.13074): an MoE layer without a router.

Shape legend as in moe.py: T tokens, d model width, n experts, k experts per token, D expert width, r the rank of
each expert's factorized gate projection, S = T * k chosen (token, expert) pairs.

Every expert's gate projection [d, D] is factorized as gate_down [d, r] then gate_up [r, D]. The forward pass:
  1. every expert pre-computes its low-rank activation for every token: a = x gate_down_e, [T, n, r], one GEMM
     for all experts ([T, d] x [d, n * r]);
  2. the experts rank themselves by the norm of that activation: logits_TE = ||a||_2 (float32); probs = softmax;
     the top-k experts per token, their probabilities renormalised to sum to 1 when k > 1 (the routed layer's
     convention, moe.route, so that an AoE arm and a routed arm differ in how experts are chosen only);
  3. the chosen experts continue from the activation already computed, sorted by expert, through the grouped GEMMs
     the routed experts use: gate = a gate_up_e, up = x up_e, y = weight * (silu(gate) * up) down_e;
  4. the load-balancing and z losses of moe.routing_losses, on these probabilities and logits.

Its coupling matrix (the specialization metrics' M) comes from its own activations: M[i, j] is the mean activation
norm of expert j on the tokens whose first choice is expert i (a routed layer's M uses router rows as the tokens of
expert i); alpha* and diagonal dominance are read from it as for a routed layer. There is no router: the metrics of
router rows (eps, router_cos) are absent for AoE, not zero.

The rank r defaults to the one that gives the routed layer's parameter count at the same width (the AoE paper's
choice): a routed expert has a router row [d] and a gate [d, D]; an AoE expert has gate_down [d, r] and gate_up
[r, D], so r = d (D + 1) / (d + D), rounded to the nearest multiple of 8 (the grouped GEMM's row alignment):
within 1% of the routed layer's parameters from d = D = 64 up.
Single-device code, like moe.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ercstudy.trainables.moe import (
    GROUPED_MM_ALIGN,
    MoEConfig,
    MoEStats,
    Routing,
    count_per_expert,
    grouped_mm,
    routing_losses,
    topk_routing,
)


def matched_rank(d_model: int, expert_dim: int) -> int:
    """The rank whose factorized gate has the parameters of a routed expert's router row and gate."""
    exact = d_model * (expert_dim + 1) / (d_model + expert_dim)
    return GROUPED_MM_ALIGN * max(1, round(exact / GROUPED_MM_ALIGN))


class AoEMoE(nn.Module):
    """n SwiGLU experts whose factorized gates choose them (no router), dropless, with the grouped GEMMs of moe.py."""

    def __init__(self, cfg: MoEConfig, d_model: int, *, rank: int | None = None):
        super().__init__()
        n, D = cfg.num_experts, cfg.expert_dim
        self.num_experts, self.top_k, self.d_model = n, cfg.top_k, d_model
        self.rank = rank or matched_rank(d_model, D)
        self.gate_down = nn.Parameter(torch.empty(n, d_model, self.rank))  # [n, d, r]
        self.gate_up = nn.Parameter(torch.empty(n, self.rank, D))  # [n, r, D]
        self.up = nn.Parameter(torch.empty(n, d_model, D))  # [n, d, D]
        self.down = nn.Parameter(torch.empty(n, D, d_model))  # [n, D, d]

    @torch.no_grad()
    def reset_parameters(self, *, std: float, out_std: float, generator: torch.Generator) -> None:
        """Normal init: the factorized gate's product with the routed gate's std (gate_up scaled by 1 / sqrt(r)),
        up with `std`, down with `out_std` (moe.random_expert_weights' scales)."""
        for p, s in ((self.gate_down, std), (self.gate_up, self.rank ** -0.5), (self.up, std), (self.down, out_std)):
            p.copy_(torch.randn(p.shape, generator=generator) * s)

    def activations(self, x_TD: Tensor) -> Tensor:
        """Every expert's low-rank gate activation of every token [T, n, r]: one GEMM."""
        n, r = self.num_experts, self.rank
        return (x_TD @ self.gate_down.permute(1, 0, 2).reshape(self.d_model, n * r)).view(-1, n, r)

    def choose(self, a_TNR: Tensor) -> Routing:
        """The experts rank themselves by the norm of their activation (moe.route's convention on these logits)."""
        return topk_routing(torch.linalg.vector_norm(a_TNR.float(), dim=-1), self.top_k)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        num_tokens, k = x_TD.shape[0], self.top_k
        # 1-2. pre-compute for every expert, choose by norm
        a_TNR = self.activations(x_TD)
        routing = self.choose(a_TNR)
        tokens_per_expert_E = count_per_expert(routing.experts_TK, self.num_experts)
        offsets_E = torch.cumsum(tokens_per_expert_E, dim=0).to(torch.int32)
        # 3. the chosen pairs, sorted by expert, continue from their activation
        experts_S = routing.experts_TK.reshape(-1)
        order_S = torch.argsort(experts_S, stable=True)
        tokens_S = order_S // k
        a_SR = a_TNR[tokens_S, experts_S[order_S]]
        gate_SF = grouped_mm(a_SR, self.gate_up, offsets_E)
        up_SF = grouped_mm(x_TD[tokens_S], self.up, offsets_E)
        h_SF = F.silu(gate_SF) * up_SF * routing.weights_TK.reshape(-1)[order_S].unsqueeze(-1).to(gate_SF.dtype)
        y_SD = grouped_mm(h_SF, self.down, offsets_E)
        # 4. unsort and sum each token's k slots (deterministic, as GroupedMoE), the routed layer's losses
        y_TKD = torch.empty_like(y_SD).index_copy_(0, order_S, y_SD).view(num_tokens, k, -1)
        out = y_TKD.sum(dim=1).to(x.dtype).view(shape)
        lb_loss, z_loss = routing_losses(routing, tokens_per_expert_E)
        with torch.no_grad():  # the coupling matrix from AoE's own activations: rows by first-chosen expert
            norms_TE1 = torch.cat([routing.logits_TE, routing.logits_TE.new_ones(num_tokens, 1)], dim=1)
            sums = routing.logits_TE.new_zeros(self.num_experts, self.num_experts + 1).index_add_(0, routing.experts_TK[:, 0], norms_TE1)
        return out, MoEStats(lb_loss, z_loss, tokens_per_expert_E, x.new_zeros((), dtype=torch.float32), routing.experts_TK, sums)

    def flops_per_token(self) -> float:
        """Forward FLOPs per token: the pre-computation for all n experts, then gate_up, up and down for k of them."""
        d, r, D = self.d_model, self.rank, self.down.shape[1]
        return 2 * self.num_experts * d * r + 2 * self.top_k * (r * D + d * D + D * d)
