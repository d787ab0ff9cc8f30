"""The ERC loss reads each layer's gates where they are: no stacked or fp32 copy of them, and no
[L, n, n, D] products kept for backward (they are recomputed one layer at a time)."""

import torch

from ercstudy.trainables.erc import coupling_activations, erc_loss


def reference_m(router, gates, eps=None):
    """M of the batched float64 formula the loss had before: ||router_i @ gate_j|| for every layer at once."""
    h = router.double().unsqueeze(-3) @ torch.stack([g.double() for g in gates])  # [L, m, n, D]
    return torch.linalg.vector_norm(h, dim=-1).transpose(-1, -2)


def make(L=3, n=8, d=16, D=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    router = (torch.randn(L, n, d, generator=g) * 0.1).to(dtype).requires_grad_()
    gates = [(torch.randn(n, d, D, generator=g) * 0.1).to(dtype).requires_grad_() for _ in range(L)]
    return router, gates


def test_per_layer_gates_give_the_stacked_result_and_gradients():
    router, gates = make()
    stacked = [g.detach().clone().requires_grad_() for g in gates]
    r2 = router.detach().clone().requires_grad_()
    a = erc_loss(router, gates, alpha=0.5, epsilon=0)
    b = erc_loss(r2, torch.stack(stacked), alpha=0.5, epsilon=0)
    torch.testing.assert_close(a.activations, reference_m(router, gates).float())
    torch.testing.assert_close(a.activations, b.activations, rtol=0, atol=0)
    a.loss.sum().backward()
    b.loss.sum().backward()
    torch.testing.assert_close(router.grad, r2.grad)
    for g, s in zip(gates, stacked):
        torch.testing.assert_close(g.grad, s.grad)


def test_backward_keeps_no_products_and_no_copy_of_the_gates():
    L, n, d, D = 3, 8, 16, 32
    router, gates = make(L, n, d, D)
    params = {t.untyped_storage().data_ptr() for t in (router, *gates)}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = erc_loss(router, gates, alpha=0.5, generator=torch.Generator().manual_seed(1)).loss.sum()
    loss.backward()  # the products are recomputed here, layer by layer
    assert all(g.grad is not None for g in gates) and router.grad is not None
    one_layer_products = n * n * D
    assert saved and max(saved) < one_layer_products, sorted(saved)[-5:]  # proxies [L, n, d], M [L, n, n]: small


def test_bf16_gates_are_read_in_bf16_with_fp32_norms():
    router, gates = make(dtype=torch.bfloat16)
    m = coupling_activations(router.float(), gates)
    assert m.dtype == torch.float32
    ref = reference_m(router, gates)
    assert ((m.double() - ref).abs() / ref).max().item() < 1e-2
