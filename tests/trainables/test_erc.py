"""The ERC loss against a plain float64 double loop, its noise, gradients, alpha* and validation."""

import math

import pytest
import torch

from ercstudy.trainables.erc import (
    coupling_alpha,
    erc_from_activations,
    erc_loss,
    make_proxies,
    noise_bound,
    resolve_epsilon,
)


def reference_layer(proxies, gate, alpha):
    """M and the loss of one layer, exactly as paper.md writes them, in float64 with Python loops."""
    p, g = proxies.double(), gate.double()
    n = p.shape[0]
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            m[i, j] = torch.linalg.vector_norm(p[i] @ g[j])
    loss = 0.0
    for i in range(n):
        for j in range(n):
            if j != i:
                loss += max(m[i, j] - alpha * m[i, i], 0.0) + max(m[j, i] - alpha * m[i, i], 0.0)
    return m, float(loss) / n**2


def reference_bound(router):
    r = router.double()
    n = r.shape[0]
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        nearest = min(torch.linalg.vector_norm(r[i] - r[j]) for j in range(n) if j != i)
        out[i] = nearest / (2 * torch.linalg.vector_norm(r[i]))
    return out


@pytest.mark.parametrize("lead", [(), (3,), (2, 2)])
@pytest.mark.parametrize("n,d,D", [(2, 3, 5), (5, 8, 4), (8, 16, 12)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_matches_double_loop_without_noise(lead, n, d, D, alpha):
    gen = torch.Generator().manual_seed(n * 100 + d)
    router = torch.randn(*lead, n, d, generator=gen)
    gate = torch.randn(*lead, n, d, D, generator=gen) / d**0.5
    out = erc_loss(router, gate, alpha=alpha, epsilon=0)
    assert out.loss.shape == lead and out.activations.shape == (*lead, n, n) and out.noise_bound.shape == (*lead, n)
    assert torch.all(out.noise_bound == 0)
    flat_r, flat_g = router.reshape(-1, n, d), gate.reshape(-1, n, d, D)
    for layer in range(flat_r.shape[0]):
        m_ref, loss_ref = reference_layer(flat_r[layer], flat_g[layer], alpha)
        torch.testing.assert_close(out.activations.reshape(-1, n, n)[layer].double(), m_ref, rtol=1e-5, atol=1e-6)
        assert out.loss.reshape(-1)[layer].item() == pytest.approx(loss_ref, rel=1e-5, abs=1e-7)


def test_noise_bound_is_the_papers_formula_and_keeps_each_proxy_in_its_cluster():
    gen = torch.Generator().manual_seed(0)
    router = torch.randn(3, 16, 24, generator=gen)
    bound = noise_bound(router)
    for layer in range(3):
        torch.testing.assert_close(bound[layer].double(), reference_bound(router[layer]), rtol=1e-4, atol=1e-6)
    proxies = make_proxies(router, bound, generator=gen)
    # elementwise |proxy - R| <= eps |R|, so ||proxy_i - R_i|| <= eps_i ||R_i|| <= half the distance to R's nearest other row
    assert torch.all((proxies - router).abs() <= bound[..., None] * router.abs() * (1 + 1e-6) + 1e-7)
    assert torch.all(torch.linalg.vector_norm(proxies - router, dim=-1) <= bound * router.norm(dim=-1) * (1 + 1e-5))
    nearest_row = torch.cdist(proxies, router).argmin(dim=-1)
    assert torch.equal(nearest_row, torch.arange(16).expand(3, 16))


def test_noisy_loss_matches_the_reference_on_the_same_proxies():
    gen = torch.Generator().manual_seed(0)
    router = torch.randn(2, 6, 10, generator=gen)
    gate = torch.randn(2, 6, 10, 7, generator=gen) / 10**0.5
    out = erc_loss(router, gate, alpha=0.8, epsilon="auto", generator=torch.Generator().manual_seed(5))
    proxies = make_proxies(router, noise_bound(router), generator=torch.Generator().manual_seed(5))
    for layer in range(2):
        m_ref, loss_ref = reference_layer(proxies[layer], gate[layer], 0.8)
        torch.testing.assert_close(out.activations[layer].double(), m_ref, rtol=1e-5, atol=1e-6)
        assert out.loss[layer].item() == pytest.approx(loss_ref, rel=1e-5, abs=1e-7)


def test_fixed_epsilon_is_exactly_that_noise_and_the_scale_multiplies_the_bound():
    gen = torch.Generator().manual_seed(0)
    router = torch.randn(4, 8, 16, generator=gen)
    bound = noise_bound(router)
    for value in (float(bound.min()) / 2, 10.0):  # below and above the bound: never clipped
        torch.testing.assert_close(resolve_epsilon(router, value), torch.full_like(bound, value))
    assert torch.equal(resolve_epsilon(router, "auto"), bound)
    torch.testing.assert_close(resolve_epsilon(router, "auto", scale=0.5), bound * 0.5)
    assert torch.all(resolve_epsilon(router, 0) == 0)
    gate = torch.randn(4, 8, 16, 4, generator=gen)
    assert torch.all(erc_loss(router, gate, epsilon=10.0).noise_bound == 10.0)
    out = erc_loss(router, gate, epsilon="auto", epsilon_scale=0.25, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out.noise_bound, bound * 0.25)
    # the proxies are drawn with exactly that noise: the same as make_proxies with eps = bound / 4
    proxies = make_proxies(router, bound * 0.25, generator=torch.Generator().manual_seed(2))
    for layer in range(4):
        m_ref, loss_ref = reference_layer(proxies[layer], gate[layer], 1.0)
        torch.testing.assert_close(out.activations[layer].double(), m_ref, rtol=1e-5, atol=1e-6)
        assert out.loss[layer].item() == pytest.approx(loss_ref, rel=1e-5, abs=1e-7)


def test_a_fixed_epsilon_reaches_beyond_the_bound():
    """epsilon 0.5 on router rows whose bound is ~0.05: the proxies move by up to 0.5 |R| elementwise."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, 16, generator=gen)
    router = base + 0.1 * torch.randn(8, 16, generator=gen)  # close rows: a small bound
    assert noise_bound(router).max() < 0.2
    proxies = make_proxies(router, resolve_epsilon(router, 0.5), generator=gen)
    ratio = ((proxies - router) / router).abs()
    assert ratio.max() > 0.45 and ratio.max() <= 0.5 + 1e-6


@pytest.mark.parametrize("router_grad", [True, False])
@pytest.mark.parametrize("epsilon", ["auto", 0.0])
def test_gradients_reach_the_gate_always_and_the_router_iff_router_grad(router_grad, epsilon):
    gen = torch.Generator().manual_seed(0)
    router = torch.randn(2, 6, 8, generator=gen, requires_grad=True)
    gate = torch.randn(2, 6, 8, 5, generator=gen, requires_grad=True)
    out = erc_loss(router, gate, alpha=0.3, epsilon=epsilon, router_grad=router_grad)
    assert out.loss.sum() > 0
    out.loss.sum().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    if router_grad:
        assert router.grad is not None and router.grad.abs().sum() > 0
    else:
        assert router.grad is None
    assert not out.noise_bound.requires_grad


def test_router_gradient_treats_the_noise_bound_as_a_constant():
    gen = torch.Generator().manual_seed(0)
    router, gate = torch.randn(5, 8, generator=gen), torch.randn(5, 8, 6, generator=gen)
    r1 = router.clone().requires_grad_()
    erc_loss(r1, gate, alpha=0.2, router_grad=True, generator=torch.Generator().manual_seed(1)).loss.backward()

    def grad_by_hand(eps_of):  # the paper's steps 2-4 in float32, with the same noise u as erc_loss draws
        r = router.clone().requires_grad_()
        u = torch.rand(r.shape, generator=torch.Generator().manual_seed(1))
        m = torch.linalg.vector_norm(torch.einsum("id,jdk->ijk", r * (1 + eps_of(r)[:, None] * (2 * u - 1)), gate), dim=-1)
        erc_from_activations(m, 0.2).backward()
        return r.grad

    def eps_with_gradient(r):
        dist = torch.cdist(r, r) + torch.diag(torch.full((5,), math.inf))
        return dist.amin(dim=-1) / (2 * r.norm(dim=-1))

    # eps frozen: the same gradient up to float32 rounding (default float32 tolerances) ...
    torch.testing.assert_close(r1.grad, grad_by_hand(lambda r: noise_bound(router)))
    # ... and one through eps differs by ~10% of the gradient's scale, far beyond them
    assert not torch.allclose(r1.grad, grad_by_hand(eps_with_gradient), rtol=1e-2, atol=1e-2)


def test_computes_in_float32_whatever_the_dtype():
    gen = torch.Generator().manual_seed(0)
    out = erc_loss(torch.randn(2, 4, 8, generator=gen, dtype=torch.bfloat16),
                   torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.bfloat16))
    assert out.loss.dtype == out.activations.dtype == out.noise_bound.dtype == torch.float32


def test_strongly_diagonal_activations_give_zero_loss():
    m = torch.full((6, 6), 0.5) + torch.diag(torch.full((6,), 9.5))
    assert erc_from_activations(m, alpha=1.0).item() == 0.0
    assert erc_from_activations(m, alpha=0.1).item() == 0.0  # 0.5 <= 0.1 * 10
    assert erc_from_activations(m, alpha=0.04).item() > 0.0


def test_coupling_alpha_on_hand_made_matrices():
    # i=0: max(M01, M10) / M00 = 3 / 2; i=1: 3 / 4 -> alpha* = 1.5
    m = torch.tensor([[2.0, 1.0], [3.0, 4.0]])
    assert coupling_alpha(m).item() == pytest.approx(1.5)
    assert erc_from_activations(m, 1.5).item() == 0.0
    assert erc_from_activations(m, 1.49).item() > 0.0
    # per layer, leading dims kept; a perfectly diagonal M needs alpha* = 0
    layers = torch.stack([m, torch.eye(2), torch.tensor([[1.0, 5.0], [0.0, 1.0]])])
    torch.testing.assert_close(coupling_alpha(layers), torch.tensor([1.5, 0.0, 5.0]))


def test_coupling_alpha_is_the_zero_loss_threshold_on_random_matrices():
    m = torch.rand(10, 7, 7, generator=torch.Generator().manual_seed(0)) + 0.1
    star = coupling_alpha(m)
    for layer in range(10):
        assert erc_from_activations(m[layer], float(star[layer])).item() == pytest.approx(0.0, abs=1e-7)
        assert erc_from_activations(m[layer], float(star[layer]) * 0.99).item() > 0.0


@pytest.mark.parametrize(
    "router,gate,kwargs,name",
    [
        (torch.ones(4, 8), torch.ones(4, 9, 5), {}, "gate"),
        (torch.ones(4, 8), torch.ones(3, 8, 5), {}, "gate"),
        (torch.ones(2, 4, 8), torch.ones(4, 8, 5), {}, "gate"),
        (torch.ones(8), torch.ones(8, 5), {}, "router"),
        (torch.ones(1, 8), torch.ones(1, 8, 5), {}, "router"),
        (torch.ones(4, 8), torch.ones(4, 8, 5), {"alpha": -0.1}, "alpha"),
        (torch.ones(4, 8), torch.ones(4, 8, 5), {"alpha": math.nan}, "alpha"),
        (torch.ones(4, 8), torch.ones(4, 8, 5), {"epsilon": -1e-3}, "epsilon"),
        (torch.ones(4, 8), torch.ones(4, 8, 5), {"epsilon": "bound"}, "epsilon"),
        (torch.ones(4, 8), torch.ones(4, 8, 5), {"epsilon_scale": -1.0}, "epsilon_scale"),
        (torch.ones(4, 8), torch.ones(4, 8, 5), {"activation": "post_norm"}, "activation"),
        (torch.ones(4, 8), torch.ones(4, 8, 5), {"activation": "up"}, "weights"),
        (torch.ones(4, 8), {"gate": torch.ones(4, 8, 5), "up": torch.ones(4, 9, 5)}, {"activation": "swiglu"}, "up"),
        (torch.ones(4, 8), {"gate": torch.ones(4, 8, 5), "up": torch.ones(4, 8, 5), "down": torch.ones(4, 8, 5)},
         {"activation": "output"}, "down"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_argument(router, gate, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        erc_loss(router, gate, **kwargs)
