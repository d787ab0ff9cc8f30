"""Specialization metrics of the MoE layers: how far router and experts are coupled and apart.

All functions take tensors stacked over the L MoE layers and return one float32 value per
layer (shape [L]); `layer_metric_tensors` computes them all, and `to_host` flattens them into
report keys `<metric>/layer<l>` plus their mean over layers under `<metric>`.
  eps_mean, eps_min    the paper's noise bound ||R_i - R_nearest|| / (2 ||R_i||)
  alpha_star           smallest alpha with zero ERC loss on the clean M (vanilla MoE ~ 5)
  diag_dominance       mean M[i, i] over mean off-diagonal M[i, j] (1 = no coupling)
  router_cos           mean |cos| between distinct router rows
  load_entropy         entropy of the expert load over log(n) (1 = perfectly balanced)
  load_max_over_mean   busiest expert's load over the mean load
  dropped              share of routed token copies dropped for capacity (deepspeed backend)
  domain_nmi           normalized mutual information between routed expert and domain
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ercstudy.trainables.erc import coupling_alpha, noise_bound


def _off_diagonal_mean(x: Tensor) -> Tensor:
    n = x.shape[-1]
    return (x.sum(dim=(-2, -1)) - x.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


def diagonal_dominance(activations: Tensor) -> Tensor:
    """[L, n, n] -> [L]: mean diagonal of M over its mean off-diagonal entry."""
    return activations.diagonal(dim1=-2, dim2=-1).mean(-1) / _off_diagonal_mean(activations).clamp_min(1e-30)


def router_cosine(router: Tensor) -> Tensor:
    """[L, n, d] -> [L]: mean |cos| between distinct router rows (the paper's baseline: about 0.15)."""
    unit = torch.nn.functional.normalize(router.float(), dim=-1)
    return _off_diagonal_mean((unit @ unit.transpose(-1, -2)).abs())


def load_balance(tokens_per_expert: Tensor) -> tuple[Tensor, Tensor]:
    """[L, n] routed counts -> (normalized entropy [L], max over mean [L])."""
    share = tokens_per_expert / tokens_per_expert.sum(-1, keepdim=True).clamp_min(1)
    entropy = -(share * share.clamp_min(1e-30).log()).sum(-1) / math.log(tokens_per_expert.shape[-1])
    return entropy, share.amax(-1) * tokens_per_expert.shape[-1]


def domain_expert_counts(experts: Tensor, domains: Tensor, num_domains: int, num_experts: int) -> Tensor:
    """Joint counts [L, num_domains, n] of (domain, routed expert) pairs.

    experts [L, B*T, k] chosen experts of B sequences of T tokens; domains [B] the domain of each sequence.
    """
    L, tokens, k = experts.shape
    per_token_domain = domains.repeat_interleave(tokens // domains.shape[0])  # [B*T]
    pair = per_token_domain[None, :, None] * num_experts + experts  # [L, B*T, k]
    flat = (pair + torch.arange(L, device=experts.device)[:, None, None] * num_domains * num_experts).reshape(-1)
    counts = torch.zeros(L * num_domains * num_experts, device=experts.device, dtype=torch.float32)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    return counts.view(L, num_domains, num_experts)


def normalized_mutual_information(joint: Tensor) -> Tensor:
    """[L, a, b] joint counts -> [L]: I(A; B) / ((H(A) + H(B)) / 2), 0 = independent, 1 = one determines the other."""
    p = joint / joint.sum(dim=(-2, -1), keepdim=True).clamp_min(1)
    pa, pb = p.sum(-1, keepdim=True), p.sum(-2, keepdim=True)

    def plogp(q: Tensor) -> Tensor:
        return (q * q.clamp_min(1e-30).log()).sum(dim=(-2, -1))

    mi = plogp(p) - (p * (pa * pb).clamp_min(1e-30).log()).sum(dim=(-2, -1))
    h = -(plogp(pa) + plogp(pb)) / 2
    return torch.where(h > 0, mi / h.clamp_min(1e-30), torch.zeros_like(h)).clamp(0, 1)


ROUTER_METRICS = ("eps_mean", "eps_min", "router_cos")  # of router rows: none for an AoE layer, which has no router
LAYER_METRICS = ("eps_mean", "eps_min", "alpha_star", "diag_dominance", "router_cos", "load_entropy", "load_max_over_mean", "dropped")


@torch.no_grad()
def to_host(per_layer: dict[str, Tensor], scalars: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Per-layer metrics [L] (reported as their mean and as `name/layer{i}`) and scalar tensors [], moved
    to the host in one transfer."""
    scalars = scalars or {}
    parts = [t.float().reshape(-1) for t in (*per_layer.values(), *scalars.values())]
    if not parts:
        return {}
    values = torch.cat([p.to(parts[0].device) for p in parts]).tolist()
    out: dict[str, float] = {}
    for name, t in per_layer.items():
        row, values = values[: t.numel()], values[t.numel() :]
        out[name] = sum(row) / len(row)
        out.update({f"{name}/layer{j}": v for j, v in enumerate(row)})
    out.update(zip(scalars, values))
    return out


@torch.no_grad()
def layer_metric_tensors(
    router: Tensor | None,
    activations: Tensor,
    tokens_per_expert: Tensor,
    dropped: Tensor,
    domain_counts: Tensor | None = None,
) -> dict[str, Tensor]:
    """LAYER_METRICS (+ domain_nmi with domain labels) of the L MoE layers, each a [L] tensor on the device. Without a
    router (AoE) the metrics of router rows (eps_mean, eps_min, router_cos) are absent, not zero."""
    entropy, max_over_mean = load_balance(tokens_per_expert)
    eps = noise_bound(router) if router is not None else None
    per_layer = {
        "eps_mean": eps.mean(-1) if eps is not None else None,
        "eps_min": eps.amin(-1) if eps is not None else None,
        "alpha_star": coupling_alpha(activations),
        "diag_dominance": diagonal_dominance(activations),
        "router_cos": router_cosine(router) if router is not None else None,
        "load_entropy": entropy,
        "load_max_over_mean": max_over_mean,
        "dropped": dropped.float(),
    }
    assert tuple(per_layer) == LAYER_METRICS
    per_layer = {name: value for name, value in per_layer.items() if value is not None}
    if domain_counts is not None:
        per_layer["domain_nmi"] = normalized_mutual_information(domain_counts)
    return per_layer
