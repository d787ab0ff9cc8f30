"""The fused LM head + cross-entropy against F.cross_entropy of the full logits: loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from ercstudy.trainables.lm_loss import linear_cross_entropy


def inputs(N=50, d=16, V=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100  # ignored positions
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_matches_the_full_logits_loss_and_gradients(chunk):
    h, w, t = inputs()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, t, chunk=chunk)
    ref = F.cross_entropy((h2 @ w2.T).float(), t, ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    (2.5 * loss).backward()
    (2.5 * ref).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=chunk), ref)


def test_bf16_operands_fp32_loss():
    h, w, t = inputs(dtype=torch.bfloat16)
    loss = linear_cross_entropy(h, w, t, chunk=16)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy((h.float() @ w.float().T), t, ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-2)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16


def test_the_model_trains_on_the_fused_loss_as_on_the_full_logits():
    from ercstudy.trainables.model import ModelConfig, MoELM
    from ercstudy.trainables.moe import MoEConfig

    lm = MoELM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, seq_len=16), MoEConfig(num_experts=4, expert_dim=16))
    idx = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(0))
    fused = lm(idx[:, :-1], idx[:, 1:], return_logits=False)
    assert fused.logits is None
    fused.lm_loss.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    full = lm(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(fused.lm_loss, full.lm_loss)
    full.lm_loss.backward()
    for n, p in lm.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_every_gemm_of_the_bf16_loss_runs_on_bf16_operands():
    """The LM head's three GEMMs (logits, d/dh, d/dW) take the weights' dtype: an fp32 one would leave the tensor cores."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):  # every aten GEMM, inside autograd Functions too
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.dtypes.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor))[:2])
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(48, 16, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, 48, (64,), generator=g)
    with Matmuls() as seen:
        linear_cross_entropy(h, w, targets, chunk=32).backward()
    assert len(seen.dtypes) == 3 * 2 and set(seen.dtypes) == {(torch.bfloat16, torch.bfloat16)}, seen.dtypes
    assert w.grad.dtype == torch.bfloat16 and torch.isfinite(w.grad.float()).all()
