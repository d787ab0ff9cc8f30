"""The hot path's fused pieces against their unfused float32/float64 references (CPU, bf16 where it applies)."""

import warnings

import torch
import torch.nn.functional as F

from ercstudy.trainables.model import apply_rope, rope_tables
from ercstudy.trainables.moe import GroupedExperts, GroupedMoE, MoEConfig, random_expert_weights, route

BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}  # a few bf16 roundings of O(1) values


def relative_error(got, ref):
    """||got - ref|| / ||ref||: bf16 results of sums hold ~2^-8 relative error overall, whatever one element does."""
    return ((got.double() - ref).norm() / ref.norm()).item()


def test_bf16_rope_matches_float32_rope_and_keeps_fp32_tables():
    cos, sin = rope_tables(256, 32, 10000.0)
    assert cos.dtype == sin.dtype == torch.float32
    x = torch.randn(2, 4, 256, 32)
    ref = apply_rope(x.double(), cos.double(), sin.double())
    out = apply_rope(x.bfloat16(), cos, sin)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, **BF16_TOL)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), ref, rtol=1e-5, atol=1e-5)  # fp32 stays exact
    # a rotation: norms of each pair are kept
    pairs = lambda t: t.double().unflatten(-1, (2, 16)).norm(dim=-2)  # noqa: E731
    torch.testing.assert_close(pairs(out), pairs(x), **BF16_TOL)


def test_bf16_router_matmul_feeds_fp32_softmax():
    gen = torch.Generator().manual_seed(0)
    x, router = torch.randn(64, 32, generator=gen), torch.randn(8, 32, generator=gen) * 0.1
    ref = route(x.double(), router.double(), 2)
    got = route(x.bfloat16(), router.bfloat16(), 2)
    assert got.logits_TE.dtype == got.probs_TE.dtype == got.weights_TK.dtype == torch.float32
    torch.testing.assert_close(got.probs_TE, ref.probs_TE, rtol=0, atol=1e-2)
    # an fp32 router (DeepSpeed's gate keeps its weight in fp32) routes in fp32 even for bf16 activations
    mixed = route(x.bfloat16(), router, 2)
    torch.testing.assert_close(mixed.logits_TE, F.linear(x.bfloat16().float(), router))


def test_fused_gate_up_and_pre_down_weighting_match_the_unfused_experts():
    """One grouped GEMM for gate and up, the routing weight on the hidden rows: the same as three separate
    projections with the weight applied to the outputs, in fp32 to 1e-5 and in bf16 to bf16 precision."""
    n, d, D, S = 4, 16, 24, 40
    gen = torch.Generator().manual_seed(1)
    experts = GroupedExperts(n, d, D)
    w = random_expert_weights(n, d, D, std=0.3, out_std=0.3, generator=gen)
    with torch.no_grad():
        experts.gate.copy_(w["gate"])
        experts.up.copy_(w["up"])
        experts.down.copy_(w["down"])
    assert torch.equal(experts.gate_up[..., :D], w["gate"]) and torch.equal(experts.gate_up[..., D:], w["up"])
    counts = torch.tensor([10, 0, 18, 12])
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(S, d, generator=gen)
    scale = torch.rand(S, generator=gen)
    owner = torch.repeat_interleave(torch.arange(n), counts)

    def unfused(x, g, u, dn):
        return torch.stack([(F.silu(x[s] @ g[owner[s]]) * (x[s] @ u[owner[s]])) @ dn[owner[s]] for s in range(S)])

    ref = unfused(x.double(), w["gate"].double(), w["up"].double(), w["down"].double()) * scale.double()[:, None]
    torch.testing.assert_close(experts(x, offsets, scale).double(), ref, rtol=1e-5, atol=1e-5)
    experts.bfloat16()
    assert relative_error(experts(x.bfloat16(), offsets, scale), ref) < 1e-2


def test_grouped_layer_backward_matches_float64_autograd():
    """Gradients through the fused layer (gate_up views, weighted hidden rows, unsort + k-sum) equal float64 autograd."""
    cfg = MoEConfig(num_experts=4, top_k=2, expert_dim=8)
    layer = GroupedMoE(cfg, 16)
    gen = torch.Generator().manual_seed(2)
    layer.load_expert_weights(random_expert_weights(4, 16, 8, std=0.3, out_std=0.3, generator=gen))
    ref = GroupedMoE(cfg, 16).double()
    ref.load_expert_weights({k: v.double() for k, v in layer.expert_weights().items()})
    x = torch.randn(2, 10, 16, generator=gen)
    for lay, inp in ((layer, x), (ref, x.double())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # float64: the per-expert reference loop, said once
            y, stats = lay(inp)
        ((y**2).sum() + stats.lb_loss).backward()
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        # fp32 error at the scale of the whole gradient (a router entry is a sum with cancellation: near zero its
        # own relative error is large: on one Xeon, off by 5e-7 of the largest entry, 1.8e-4 of the entry itself)
        scale = float(p_ref.grad.abs().max())
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
