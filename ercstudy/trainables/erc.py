"""The expert-router coupling (ERC) loss of Lv, Ma, Ma and Qiao, "Coupling Experts and Routers in
Mixture-of-Experts via an Auxiliary Loss" (arXiv 2512.23447).

Shape legend: `...` = leading MoE-layer dims (one call handles every layer), n = experts,
m = experts whose gate projections this call sees (m = n, or n / ep_size for the local
columns under expert parallelism), d = model width, D = expert hidden width.

For one layer with router R [n, d] and gate projections G [n, d, D]:
  1. eps_i <= ||R_i - R_nearest(i)|| / (2 ||R_i||)            (noise bound, no gradient)
  2. proxy_i = R_i * delta_i, delta_i ~ U(1 - eps_i, 1 + eps_i)^d
  3. M[i, j] = ||proxy_i @ G_j||                              [n, n]
  4. L = 1/n^2 sum_{i != j} relu(M[i,j] - alpha M[i,i]) + relu(M[j,i] - alpha M[i,i])

The paper's ablations are arguments: `epsilon` ("auto" = the bound of step 1 times `epsilon_scale`,
0 = no noise, a number = exactly that noise for every proxy), `router_grad` (the paper's pseudocode
builds the proxies under no_grad: the router gets no ERC gradient; True lets it flow through the
proxies) and `activation`, the expert activation whose norm forms M in step 3 (with up projections
U [n, d, D] and down projections W [n, D, d]):
  gate       ||proxy_i @ G_j||                                    (the paper's choice, the default)
  up         ||proxy_i @ U_j||
  silu_gate  ||SiLU(proxy_i @ G_j)||
  swiglu     ||SiLU(proxy_i @ G_j) * (proxy_i @ U_j)||            (the expert's hidden row)
  output     ||(SiLU(proxy_i @ G_j) * (proxy_i @ U_j)) @ W_j||    (the expert's output)

M is computed layer by layer, one batched matmul over each layer's experts in the gates' own dtype
(bf16 operands accumulate in fp32) with float32 norms, and each layer's products are recomputed in
backward rather than kept; the loss is float32, with no host synchronisation. Under expert parallelism each rank computes
the columns of M for its local experts from identical proxies, and a `gather_columns` callable
that the caller supplies (this file knows no process groups) assembles the whole M.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ercstudy.trainables.validation import require

Epsilon = float | Literal["auto"]
Activation = Literal["gate", "up", "silu_gate", "swiglu", "output"]
# the expert weights each activation reads (erc_loss's `weights` names them)
ACTIVATION_WEIGHTS: dict[str, tuple[str, ...]] = {
    "gate": ("gate",), "up": ("up",), "silu_gate": ("gate",), "swiglu": ("gate", "up"), "output": ("gate", "up", "down"),
}


@dataclass(frozen=True, kw_only=True)
class ERCConfig:
    """How a trial applies the ERC loss (the `erc:` section of a trial config)."""

    enabled: bool = True  # add the ERC loss (false: the baseline MoE)
    alpha: float = 1.0  # coupling strength; smaller is stricter. The paper sweeps 0.4 .. 3.
    # "auto" = the paper's bound per expert, recomputed every step (times epsilon_scale);
    # a number = exactly that noise for every proxy (not clipped to the bound); 0 = no noise (the paper's ablation)
    epsilon: Epsilon = "auto"
    epsilon_scale: float = 1.0  # with epsilon auto: a factor on the bound (0.5 = half the admissible noise)
    weight: float = 1.0  # coefficient of the ERC term in the total loss
    # False (the default) follows the paper's pseudocode, which builds the noisy router under torch.no_grad():
    # the router gets no ERC gradient, only the experts do. True (a variant) lets it flow through the proxies.
    router_grad: bool = False
    activation: Activation = "gate"  # what forms M: gate (R~W_g, the paper's), up, silu_gate, swiglu, output
    layer_reduction: Literal["mean", "sum"] = "mean"  # over MoE layers

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        _check_epsilon(self.epsilon)
        _check_epsilon_scale(self.epsilon_scale)
        require(self.epsilon == "auto" or self.epsilon_scale == 1.0, "epsilon_scale",
                f"scales the automatic bound: it needs epsilon auto (epsilon is {self.epsilon!r}), got {self.epsilon_scale}")
        require(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class ERCResult:
    loss: Tensor  # [...] one value per MoE layer, float32
    activations: Tensor  # [..., n, n] M[i, j] = ||activation of expert j on proxy_i||, float32
    noise_bound: Tensor  # [..., n] the eps_i actually used, float32, no gradient


# The argument checks of the loss, shared by ERCConfig (the trial config) and erc_loss (direct calls):
# ConfigError is a ValueError whose message starts with the argument's name.


def _check_alpha(alpha: float) -> None:
    ok = not isinstance(alpha, bool) and isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0
    require(ok, "alpha", f"must be >= 0 (a finite number), got {alpha!r}")


def _check_epsilon(epsilon: Epsilon) -> None:
    if isinstance(epsilon, str):
        ok = epsilon == "auto"
    else:
        ok = not isinstance(epsilon, bool) and isinstance(epsilon, (int, float)) and epsilon >= 0
    require(ok, "epsilon", f"must be 'auto' or a number >= 0, got {epsilon!r}")


def _check_epsilon_scale(scale: float) -> None:
    ok = not isinstance(scale, bool) and isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0
    require(ok, "epsilon_scale", f"must be a finite number >= 0, got {scale!r}")


def _check_activation(activation: str) -> None:
    require(activation in ACTIVATION_WEIGHTS, "activation", f"must be one of {', '.join(ACTIVATION_WEIGHTS)}, got {activation!r}")


Gates = Tensor | Sequence[Tensor]  # stacked [..., n, d, D], or one [n, d, D] tensor per layer (no stacked copy)
# The experts' weights as erc_loss takes them: the gate projections alone (Gates), or by name, those the
# activation reads: {"gate": ..., "up": ...} [..., n, d, D] and {"down": ...} [..., n, D, d], each stacked or per layer.
Weights = Gates | Mapping[str, Gates]


def _named_weights(weights: Weights, activation: str) -> dict[str, Gates]:
    """The weights `activation` reads, by name, in ACTIVATION_WEIGHTS order (a bare tensor or sequence is the gates)."""
    _check_activation(activation)
    named = dict(weights) if isinstance(weights, Mapping) else {"gate": weights}
    unknown = sorted(set(named) - {"gate", "up", "down"})
    if unknown:
        raise ValueError(f"weights: unknown expert weights {unknown}; allowed: gate, up, down")
    missing = [k for k in ACTIVATION_WEIGHTS[activation] if named.get(k) is None]
    if missing:
        raise ValueError(f"weights: activation {activation!r} reads the experts' {', '.join(ACTIVATION_WEIGHTS[activation])} "
                         f"projections; missing: {', '.join(missing)}")
    return {k: named[k] for k in ACTIVATION_WEIGHTS[activation]}


def _layers(gate: Gates) -> list[Tensor]:
    """The per-layer weight tensors [m, a, b] (views of a stacked tensor, or the sequence as given)."""
    if torch.is_tensor(gate):
        if gate.dim() < 3:
            raise ValueError(f"gate: expected shape [..., n, d, D], got {tuple(gate.shape)}")
        return list(gate.reshape(-1, *gate.shape[-3:]).unbind(0))
    return list(gate)


def _check_shapes(router: Tensor, gate: Gates, *, local: bool = False, name: str = "gate") -> None:
    """`gate` (or the up projections, named `name`) [..., n, d, D] against router [..., n, d]."""
    if not torch.is_tensor(gate):  # one tensor per layer: check each layer as a router/gate pair
        layers = list(gate)
        if router.dim() != 3 or len(layers) != router.shape[0] or any(g.dim() != 3 for g in layers):
            raise ValueError(f"{name}: expected one [n, d, D] tensor per layer of router {tuple(router.shape)}, "
                             f"got {[tuple(g.shape) for g in layers]}")
        for layer, g in zip(router.unbind(0), layers):
            _check_shapes(layer, g, local=local, name=name)
        return
    if router.dim() < 2:
        raise ValueError(f"router: expected shape [..., n, d], got {tuple(router.shape)}")
    if gate.dim() != router.dim() + 1:
        raise ValueError(
            f"{name}: expected shape [..., n, d, D] with one more dim than router {tuple(router.shape)}, "
            f"got {tuple(gate.shape)}"
        )
    columns_ok = gate.shape[-3] >= 1 if local else gate.shape[-3] == router.shape[-2]
    if gate.shape[:-3] != router.shape[:-2] or gate.shape[-2] != router.shape[-1] or not columns_ok:
        raise ValueError(
            f"{name}: shape {tuple(gate.shape)} does not match router {tuple(router.shape)} "
            f"(expected {name} [..., n, d, D] for router [..., n, d])"
        )
    if router.shape[-2] < 2:
        raise ValueError(f"router: ERC needs n >= 2 experts, got n = {router.shape[-2]}")


def _check_weights(router: Tensor, named: dict[str, Gates], *, local: bool) -> None:
    for name, w in named.items():
        if name == "down":  # [..., m, D, d]: the up projections' shape with its last two dims swapped
            w = w.transpose(-1, -2) if torch.is_tensor(w) else [x.transpose(-1, -2) for x in w]
        _check_shapes(router, w, local=local, name=name)
    per_layer = [[tuple(x.shape) for x in _layers(w)] for w in named.values()]
    m = {s[0] for layer in per_layer for s in layer}
    widths = {s[2] if name != "down" else s[1] for name, layer in zip(named, per_layer) for s in layer}
    if len(m) > 1 or len(widths) > 1:
        raise ValueError(f"weights: {', '.join(named)} disagree on the number of experts or the expert width: "
                         f"{dict(zip(named, per_layer))}")


@torch.no_grad()
def noise_bound(router: Tensor) -> Tensor:
    """The paper's largest admissible noise per expert, eps_i = ||R_i - R_j*|| / (2 ||R_i||).

    router [..., n, d] -> [..., n] float32, j* the nearest other row. No gradient.
    """
    r = router.detach().float()
    # Distances from differences, not from the |a|^2 + |b|^2 - 2ab expansion that cdist uses for n > 25:
    # that one cancels for close rows (the very case the bound is about) and was off by 7x against float64.
    dist = torch.cdist(r, r, compute_mode="donot_use_mm_for_euclid_dist")  # [..., n, n]
    dist.diagonal(dim1=-2, dim2=-1).fill_(math.inf)
    nearest = dist.amin(dim=-1)  # [..., n]
    return nearest / (2 * r.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny))


def resolve_epsilon(router: Tensor, epsilon: Epsilon, *, scale: float = 1.0) -> Tensor:
    """eps_i to use for each proxy [..., n] float32: the bound times `scale` ("auto"), zeros (0), or
    exactly the given number for every proxy (not clipped to the bound: a fixed-noise arm is that noise)."""
    _check_epsilon(epsilon)
    _check_epsilon_scale(scale)
    if epsilon == "auto":
        bound = noise_bound(router)
        return bound if scale == 1 else bound * scale
    return torch.full(router.shape[:-1], float(epsilon), device=router.device, dtype=torch.float32)


def make_proxies(router: Tensor, eps: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """proxy_i = R_i * delta_i with delta_i ~ U(1 - eps_i, 1 + eps_i)^d elementwise. [..., n, d] float32.

    Gradient reaches `router` through the proxies (detach the router to stop it); the noise carries none.
    Pass a generator seeded identically on every rank to get identical proxies everywhere.
    """
    r = router.float()
    u = torch.rand(r.shape, generator=generator, device=r.device, dtype=torch.float32)
    delta = 1 + eps.detach()[..., None] * (2 * u - 1)
    return r * delta


def _layer_coupling(activation: str, proxies_nd: Tensor, *weights: Tensor) -> Tensor:
    """One layer: proxies [n, d] and the m experts' weights that `activation` reads (ACTIVATION_WEIGHTS order:
    gate/up [m, d, D], down [m, D, d]) -> M [n, m] float32. The matmuls run in the weights' own dtype (bf16
    operands accumulate in fp32), the norms in float32 (or wider)."""
    w = dict(zip(ACTIVATION_WEIGHTS[activation], weights))
    x_nd = proxies_nd.to(weights[0].dtype)
    if activation == "up":
        h_mnF = torch.matmul(x_nd, w["up"])  # one batched matmul over the m experts
    else:
        h_mnF = torch.matmul(x_nd, w["gate"])
        if activation != "gate":
            h_mnF = F.silu(h_mnF)
        if activation in ("swiglu", "output"):
            h_mnF = h_mnF * torch.matmul(x_nd, w["up"])
        if activation == "output":
            h_mnF = torch.matmul(h_mnF, w["down"])  # [m, n, d]
    norm_dtype = torch.promote_types(h_mnF.dtype, torch.float32)
    return torch.linalg.vector_norm(h_mnF, dim=-1, dtype=norm_dtype).float().transpose(0, 1)


def coupling_activations(proxies: Tensor, weights: Weights, *, activation: Activation = "gate") -> Tensor:
    """M[..., i, j] = ||activation of expert j on proxies_i||_2 in float32. proxies [..., n, d], weights: the
    gates [..., m, d, D] (or one [m, d, D] tensor per layer), or by name those `activation` reads -> [..., n, m].

    Layer by layer, reading each layer's weights where they are (no stacked or fp32 copy of them), and
    under autograd with each layer's [m, n, D] products recomputed in backward instead of saved: the
    extra memory is one layer's products, whatever the number of layers.
    """
    named = _named_weights(weights, activation)
    layers = list(zip(*(_layers(w) for w in named.values())))  # per layer: its weights in ACTIVATION_WEIGHTS order
    p = proxies.reshape(-1, *proxies.shape[-2:])  # [layers, n, d]
    grad = torch.is_grad_enabled() and (p.requires_grad or any(w.requires_grad for ws in layers for w in ws))
    columns = [checkpoint(_layer_coupling, activation, p[i], *ws, use_reentrant=False) if grad
               else _layer_coupling(activation, p[i], *ws)
               for i, ws in enumerate(layers)]
    return torch.stack(columns).reshape(*proxies.shape[:-1], columns[0].shape[-1])


def erc_from_activations(activations: Tensor, alpha: float = 1.0) -> Tensor:
    """The ERC loss of a full activation matrix M [..., n, n] -> [...] (mean over all n^2 entries)."""
    _check_alpha(alpha)
    m = activations
    n = m.shape[-1]
    if m.dim() < 2 or m.shape[-2] != n:
        raise ValueError(f"activations: expected a square [..., n, n] matrix, got {tuple(m.shape)}")
    threshold = alpha * m.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # [..., n, 1]: alpha M[i, i] for row i
    violation = torch.relu(m - threshold) + torch.relu(m.transpose(-1, -2) - threshold)  # [..., i, j]
    off_diagonal = 1 - torch.eye(n, device=m.device, dtype=m.dtype)
    return (violation * off_diagonal).sum(dim=(-2, -1)) / (n * n)


@torch.no_grad()
def coupling_alpha(activations: Tensor) -> Tensor:
    """alpha*: the smallest alpha at which M [..., n, n] has zero ERC loss, per layer -> [...].

    alpha* = max_{i != j} max(M[i, j], M[j, i]) / M[i, i]. A vanilla MoE sits near 5 in the paper.
    """
    m = activations.detach().float()
    n = m.shape[-1]
    worst = torch.maximum(m, m.transpose(-1, -2))  # [..., i, j]
    diag = m.diagonal(dim1=-2, dim2=-1).unsqueeze(-1).clamp_min(torch.finfo(torch.float32).tiny)
    ratio = (worst / diag).masked_fill(torch.eye(n, dtype=torch.bool, device=m.device), -math.inf)
    return ratio.amax(dim=(-2, -1))


def erc_loss(
    router: Tensor,
    weights: Weights,
    *,
    alpha: float = 1.0,
    epsilon: Epsilon = "auto",
    epsilon_scale: float = 1.0,
    router_grad: bool = True,
    activation: Activation = "gate",
    generator: torch.Generator | None = None,
    gather_columns: Callable[[Tensor], Tensor] | None = None,
) -> ERCResult:
    """ERC loss for every MoE layer at once. Training, the benchmarks and the tests all call this.

    router [..., n, d]: router rows. weights: each expert's gate projection [..., n, d, D] (x @ gate[j]),
    or one [n, d, D] tensor per layer (router [L, n, d]), as MoELM.gate_weights() gives them; for another
    `activation`, a dict of the weights it reads (ACTIVATION_WEIGHTS: gate, up [..., n, d, D], down
    [..., n, D, d]), as MoELM.expert_weights_of gives them.
    Returns per-layer losses [...], the activation matrices M [..., n, n] and the eps_i used [..., n].
    epsilon=0 gives the clean M (proxies = router rows, no draw); epsilon_scale multiplies the automatic bound.
    router_grad=False detaches the proxies (the paper's pseudocode, and the trial config's default);
    this function's own default, True, lets the router's gradient flow through them.

    gather_columns: under expert parallelism the weights hold only this rank's m experts [..., m, d, D];
    the callable turns this rank's columns of M [..., n, m] into the whole M [..., n, n] (an
    all-gather over the expert-parallel group; the noise must then be the same on every rank).
    """
    named = _named_weights(weights, activation)
    _check_weights(router, named, local=gather_columns is not None)
    _check_alpha(alpha)
    eps = resolve_epsilon(router, epsilon, scale=epsilon_scale)  # [..., n]
    r = router if router_grad else router.detach()
    proxies = r.float() if epsilon == 0 else make_proxies(r, eps, generator=generator)
    m = coupling_activations(proxies, named, activation=activation)  # [..., n, m]
    if gather_columns is not None:
        m = gather_columns(m)  # [..., n, n]
    return ERCResult(loss=erc_from_activations(m, alpha), activations=m, noise_bound=eps)
