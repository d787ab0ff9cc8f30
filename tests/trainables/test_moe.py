"""The MoE backends against references: a dense SwiGLU, a per-token loop, and each other."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from ercstudy.trainables import moe
from ercstudy.trainables.model import SwiGLU
from ercstudy.trainables.moe import GroupedMoE, MoEConfig, grouped_mm, random_expert_weights
from ercstudy.trainables.parallelize import moe_layer


def make(backend, d=16, **moe):
    cfg = MoEConfig(backend=backend, **moe)
    layer = moe_layer(cfg, d)
    gen = torch.Generator().manual_seed(0)
    layer.load_expert_weights(random_expert_weights(cfg.num_experts, d, cfg.expert_dim, std=0.3, out_std=0.3, generator=gen))
    return layer


def per_token_reference(layer: GroupedMoE, x):
    """Route and run every token through its experts one at a time, in float64."""
    w = {k: v.detach().double() for k, v in layer.expert_weights().items()}
    x = x.reshape(-1, x.shape[-1]).double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ w["router"].T, dim=-1)
        top_p, top_e = torch.topk(probs, layer.top_k)
        if layer.top_k > 1:
            top_p = top_p / top_p.sum()
        for p, e in zip(top_p, top_e):
            out[t] += p * ((F.silu(x[t] @ w["gate"][e]) * (x[t] @ w["up"][e])) @ w["down"][e])
    return out


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_one_expert_top1_equals_dense_swiglu(backend):
    layer = make(backend, num_experts=1, top_k=1, expert_dim=24)
    dense = SwiGLU(16, 24)
    w = layer.expert_weights()
    with torch.no_grad():
        dense.gate.weight.copy_(w["gate"][0].T)
        dense.up.weight.copy_(w["up"][0].T)
        dense.down.weight.copy_(w["down"][0].T)
    x = torch.randn(3, 7, 16)
    y, stats = layer(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)
    assert stats.tokens_per_expert.tolist() == [21.0]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_equals_per_token_reference(k):
    layer = make("grouped", num_experts=5, top_k=k, expert_dim=8)
    x = torch.randn(4, 6, 16)
    y, stats = layer(x)
    torch.testing.assert_close(y.reshape(-1, 16).double(), per_token_reference(layer, x), rtol=1e-4, atol=1e-5)
    assert stats.tokens_per_expert.sum().item() == 4 * 6 * k
    assert stats.experts_TK.shape == (24, k)


def test_grouped_mm_fallback_equals_torch_grouped_mm():
    x, w = torch.randn(20, 16), torch.randn(4, 16, 8)
    offsets = torch.tensor([5, 5, 12, 20], dtype=torch.int32)  # one empty group
    reference = torch.cat([x[0:5] @ w[0], x[5:12] @ w[2], x[12:20] @ w[3]])
    torch.testing.assert_close(grouped_mm(x, w, offsets), reference)
    # unaligned width (5 floats = 20 bytes) takes the per-group path, and says so once
    moe._fallback_warned.clear()
    with pytest.warns(RuntimeWarning, match="not multiples of 4 torch.float32 values"):
        y = grouped_mm(x[:, :5], w[:, :5], offsets)
    torch.testing.assert_close(y, torch.cat([x[0:5, :5] @ w[0, :5], x[5:12, :5] @ w[2, :5], x[12:20, :5] @ w[3, :5]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grouped_mm(x[:, :5], w[:, :5], offsets)  # the second time: no warning


def test_grouped_backend_refuses_widths_the_grouped_gemm_cannot_align():
    from ercstudy.trainables.config import TrialConfig
    from ercstudy.trainables.validation import ConfigError

    with pytest.raises(ConfigError, match=r"^moe.expert_dim: must be a multiple of 8 for the grouped backend"):
        TrialConfig.from_dict({"moe": {"expert_dim": 20}})
    TrialConfig.from_dict({"moe": {"expert_dim": 20, "backend": "deepspeed"}})  # DeepSpeed's layer has no such limit


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_deepspeed_without_drops_equals_grouped(k):
    grouped = make("grouped", num_experts=6, top_k=k, expert_dim=8)
    ds = make("deepspeed", num_experts=6, top_k=k, expert_dim=8)
    ds.load_expert_weights(grouped.expert_weights())
    x = torch.randn(3, 10, 16)
    xg, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    yg, sg = grouped(xg)
    yd, sd = ds(xd)
    torch.testing.assert_close(yd, yg, rtol=1e-5, atol=1e-6)
    for field in ("lb_loss", "z_loss", "tokens_per_expert", "experts_TK"):
        torch.testing.assert_close(getattr(sd, field), getattr(sg, field))
    assert sd.dropped_fraction.item() == 0.0
    # same gradients, into the input, the router and every expert
    ((yg**2).sum() + sg.lb_loss).backward()
    ((yd**2).sum() + sd.lb_loss).backward()
    torch.testing.assert_close(xd.grad, xg.grad, rtol=1e-4, atol=1e-6)
    # the grouped layer scales the [D]-wide hidden rows by the routing weight, DeepSpeed the [d]-wide outputs:
    # the router's gradient sums the same products in another order (fp32 reassociation, ~1e-6)
    torch.testing.assert_close(ds.router_weight.grad, grouped.router.grad, rtol=1e-4, atol=1e-5)
    for i, expert in enumerate(ds.moe.deepspeed_moe.experts.deepspeed_experts):
        gate_grad, up_grad = grouped.experts.gate_up.grad[i].chunk(2, dim=-1)
        torch.testing.assert_close(expert.gate.grad, gate_grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(expert.up.grad, up_grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(expert.down.grad, grouped.experts.down.grad[i], rtol=1e-4, atol=1e-6)


def test_deepspeed_capacity_drops_tokens_and_reports_it():
    layer = make("deepspeed", num_experts=4, top_k=1, expert_dim=8, drop_tokens=True, capacity_factor=0.5)
    _, stats = layer(torch.randn(2, 32, 16))
    assert 0.0 < stats.dropped_fraction.item() < 1.0


def test_routing_losses_are_those_of_a_balanced_router_when_uniform():
    layer = make("grouped", num_experts=4, top_k=2, expert_dim=8)
    with torch.no_grad():
        layer.router.zero_()  # uniform probabilities: lb = n * sum_e (1/n) f_e = 1, z = log(n)^2
    _, stats = layer(torch.randn(2, 8, 16))
    assert stats.lb_loss.item() == pytest.approx(1.0)
    assert stats.z_loss.item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"^top_k: must be <= num_experts \(4\), got 5"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"^num_experts:"):
        MoEConfig(num_experts=0, top_k=1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_router_logits_are_float32_never_rounded_to_bf16(device):
    """bf16 operands (a bf16 trial's), float32 logits equal to the float64 product of the same values: rounded to bf16
    first (8 bits of mantissa), near-tied experts would swap in top-k."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g).bfloat16().to(device)
    w = (torch.randn(16, 64, generator=g) * 0.1).bfloat16().to(device)
    logits = moe.router_logits(x, w)
    exact = x.double() @ w.double().T
    assert logits.dtype == torch.float32
    assert (logits.double() - exact).abs().max() < 1e-4 * exact.abs().max()  # fp32 accumulation, no bf16 output
    rounded = (x @ w.T).double()  # what a bf16 output would hold
    assert (rounded - exact).abs().max() > 1e-3 * exact.abs().max()  # the check can tell them apart


class OpsLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops run under it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("activation", ["gate", "swiglu"])
def test_erc_reads_gate_and_up_without_a_full_size_gradient_of_each_half(activation):
    """The experts' forward and the ERC loss in one backward: gate_up's gradient equals that of plain slices
    (the reference), and no half's gradient is spread into a full-size zero tensor (aten.slice_backward)."""
    from ercstudy.trainables.erc import ACTIVATION_WEIGHTS, erc_loss

    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(1))
    grads, ops = [], []
    for halves in (True, False):
        layer = make("grouped", num_experts=4, top_k=2, expert_dim=8)
        out, _ = layer(x)
        experts = layer.experts
        named = {"gate": experts.gate, "up": experts.up} if halves else \
            {"gate": experts.gate_up[..., :8], "up": experts.gate_up[..., 8:]}
        weights = {k: named[k] for k in ACTIVATION_WEIGHTS[activation]}
        erc = erc_loss(layer.router, weights, alpha=0.5, epsilon=0, activation=activation).loss
        with OpsLog() as log:
            (out.square().mean() + 10 * erc).backward()
        grads.append(experts.gate_up.grad)
        ops.append(log.ops)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    assert "slice_backward" not in ops[0] and "slice_backward" in ops[1]  # the reference does spread them
