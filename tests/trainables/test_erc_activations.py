"""The ERC loss's switches (paper.md's ablations): each activation variant against a float64 double loop,
its gradients against float64 autograd, the router-gradient switch, the trial config's defaults and
checks, training's coupling() on a model, and every variant under expert parallelism (two gloo processes,
each holding half the experts, the real parallelize.gather_columns assembling M)."""

import os
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from ercstudy.netutil import free_port
from ercstudy.trainables.config import TrialConfig
from ercstudy.trainables.erc import ACTIVATION_WEIGHTS, ERCConfig, erc_loss, make_proxies, noise_bound
from ercstudy.trainables.validation import ConfigError

ACTIVATIONS = list(ACTIVATION_WEIGHTS)


def activation_of(name, x, gate, up, down):
    """One expert's activation on one proxy x [d], as paper.md names them; float64."""
    if name == "gate":
        return x @ gate
    if name == "up":
        return x @ up
    if name == "silu_gate":
        return F.silu(x @ gate)
    hidden = F.silu(x @ gate) * (x @ up)
    return hidden if name == "swiglu" else hidden @ down


def reference(name, proxies, weights, alpha):
    """M and the loss of one layer with Python loops over proxies i and experts j, in float64."""
    p = proxies.double()
    g, u, w = (weights[k].double() for k in ("gate", "up", "down"))
    n = p.shape[0]
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            m[i, j] = torch.linalg.vector_norm(activation_of(name, p[i], g[j], u[j], w[j]))
    loss = sum(torch.relu(m[i, j] - alpha * m[i, i]) + torch.relu(m[j, i] - alpha * m[i, i])
               for i in range(n) for j in range(n) if j != i)
    return m, loss / n**2


def make(L=2, n=6, d=8, D=5, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(L, n, d, generator=g)
    weights = {"gate": torch.randn(L, n, d, D, generator=g) / d**0.5, "up": torch.randn(L, n, d, D, generator=g) / d**0.5,
               "down": torch.randn(L, n, D, d, generator=g) / D**0.5}
    if requires_grad:
        router.requires_grad_()
        for w in weights.values():
            w.requires_grad_()
    return router, weights


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("epsilon", [0, "auto", 0.3])
def test_each_activation_matches_the_float64_double_loop(activation, epsilon):
    router, weights = make(seed=len(activation))
    out = erc_loss(router, weights, alpha=0.7, epsilon=epsilon, activation=activation, generator=torch.Generator().manual_seed(4))
    eps = torch.zeros(2, 6) if epsilon == 0 else noise_bound(router) if epsilon == "auto" else torch.full((2, 6), 0.3)
    torch.testing.assert_close(out.noise_bound, eps)
    proxies = router if epsilon == 0 else make_proxies(router, eps, generator=torch.Generator().manual_seed(4))
    for layer in range(2):
        m_ref, loss_ref = reference(activation, proxies[layer], {k: w[layer] for k, w in weights.items()}, 0.7)
        torch.testing.assert_close(out.activations[layer].double(), m_ref, rtol=1e-5, atol=1e-6)
        assert out.loss[layer].item() == pytest.approx(loss_ref.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("router_grad", [False, True])
def test_gradients_match_float64_autograd_and_reach_only_the_weights_the_activation_reads(activation, router_grad):
    router, weights = make(seed=1, requires_grad=True)
    out = erc_loss(router, weights, alpha=0.2, activation=activation, router_grad=router_grad,
                   generator=torch.Generator().manual_seed(9))
    out.loss.sum().backward()
    # float64 reference: the same noise draw, the eps bound a constant, the router detached unless router_grad
    r64 = router.detach().double().requires_grad_()
    w64 = {k: w.detach().double().requires_grad_() for k, w in weights.items()}
    u = torch.rand(router.shape, generator=torch.Generator().manual_seed(9))
    eps = noise_bound(router).double()
    proxies = (r64 if router_grad else r64.detach()) * (1 + eps[..., None] * (2 * u.double() - 1))
    total = sum(reference(activation, proxies[layer], {k: w[layer] for k, w in w64.items()}, 0.2)[1] for layer in range(2))
    total.backward()
    if router_grad:
        torch.testing.assert_close(router.grad.double(), r64.grad, rtol=1e-4, atol=1e-6)
    else:
        assert router.grad is None
    for name, w in weights.items():
        if name in ACTIVATION_WEIGHTS[activation]:
            assert w.grad is not None and w.grad.abs().sum() > 0
            torch.testing.assert_close(w.grad.double(), w64[name].grad, rtol=1e-4, atol=1e-6)
        else:
            assert w.grad is None  # not read: the loss has no path to it


def test_a_bare_tensor_is_the_gates_and_a_dict_may_hold_more_than_the_activation_reads():
    router, weights = make(seed=2)
    a = erc_loss(router, weights["gate"], epsilon=0)
    b = erc_loss(router, weights, epsilon=0)
    assert torch.equal(a.activations, b.activations)
    per_layer = {k: list(w.unbind(0)) for k, w in weights.items()}  # one tensor per layer, as MoELM gives them
    for activation in ACTIVATIONS:
        torch.testing.assert_close(erc_loss(router, per_layer, epsilon=0, activation=activation).activations,
                                   erc_loss(router, weights, epsilon=0, activation=activation).activations, rtol=0, atol=0)


def test_trial_config_defaults_follow_the_paper_and_check_the_switches():
    e = TrialConfig.from_dict({}).erc
    assert (e.router_grad, e.epsilon, e.epsilon_scale, e.activation) == (False, "auto", 1.0, "gate")
    cfg = TrialConfig.from_dict({"erc": {"activation": "swiglu", "epsilon_scale": 0.5, "router_grad": True}})
    assert cfg.erc.activation == "swiglu" and cfg.erc.epsilon_scale == 0.5
    with pytest.raises(ConfigError, match=r"^erc\.epsilon_scale: scales the automatic bound: it needs epsilon auto"):
        TrialConfig.from_dict({"erc": {"epsilon": 0.02, "epsilon_scale": 0.5}})
    with pytest.raises(ConfigError, match=r"^erc\.activation: must be one of"):
        TrialConfig.from_dict({"erc": {"activation": "post_swiglu"}})
    with pytest.raises(ConfigError, match=r"^epsilon_scale: must be a finite number >= 0"):
        ERCConfig(epsilon_scale=-0.5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_trainings_coupling_reads_the_models_expert_weights(activation):
    """step.coupling on a built model: the activation's weights from MoELM.expert_weights_of, the metrics'
    clean M always the paper's gate-projection M."""
    from ercstudy.trainables.model import MoELM
    from ercstudy.trainables.step import coupling

    cfg = TrialConfig.from_dict({"model": {"vocab_size": 256, "d_model": 16, "n_layers": 2, "n_heads": 2, "seq_len": 32},
                                 "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 8},
                                 "erc": {"activation": activation, "alpha": 0.5, "router_grad": True}})
    lm = MoELM(cfg.model, cfg.moe, seed=1)
    got = coupling(lm, cfg, None, generator=torch.Generator().manual_seed(3))
    layers = [layer.expert_weights() for layer in lm.moe_layers]
    weights = {k: torch.stack([w[k] for w in layers]).detach() for k in ("gate", "up", "down")}
    router = lm.router_weights().detach()
    want = erc_loss(router, weights, alpha=0.5, activation=activation, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got.activations, want.activations)
    got.loss.sum().backward()
    assert all(layer.router_weight.grad is not None for layer in lm.moe_layers)
    clean = coupling(lm, cfg, None, generator=None, clean=True)
    torch.testing.assert_close(clean.activations, erc_loss(router, weights["gate"], epsilon=0).activations)


# ---------------------------------------------------------------------------------------------
# Expert parallelism: two ranks, each with half the experts of every layer


EP_SEED = 11


def ep_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from ercstudy.trainables.parallelize import gather_columns

    # one intra-op thread per rank: the two ranks share 2 cores with the rest of the suite, and torch's default
    # threads per rank spin against each other at every collective (this test: 22 s alone with them, 12 s without)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    router, weights = make(L=2, n=8, d=8, D=6, seed=EP_SEED)
    local = slice(rank * 4, (rank + 1) * 4)
    results = {}
    for activation in ACTIVATIONS:
        r = router.clone().requires_grad_()
        w = {k: v[:, local].clone().requires_grad_() for k, v in weights.items()}
        out = erc_loss(r, w, alpha=0.6, activation=activation, router_grad=True, generator=torch.Generator().manual_seed(5),
                       gather_columns=partial(gather_columns, group=dist.group.WORLD))
        out.loss.sum().backward()
        results[activation] = {"m": out.activations.detach(), "loss": out.loss.detach(), "router_grad": r.grad,
                               **{f"grad_{k}": (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in w.items()}}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # leave without tearing gloo down (see test_expert_parallel.py)


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("erc_ep")
    mp.spawn(ep_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_activation_under_expert_parallelism_gives_the_single_device_loss_and_gradients(ep_results, activation):
    """Each rank sees the whole M and loss; DeepSpeed averages gradients over the 2 data-parallel ranks, so the
    average over ranks of the router's gradient, and each rank's expert gradients over 2, are the full ones."""
    router, weights = make(L=2, n=8, d=8, D=6, seed=EP_SEED, requires_grad=True)
    full = erc_loss(router, weights, alpha=0.6, activation=activation, router_grad=True, generator=torch.Generator().manual_seed(5))
    full.loss.sum().backward()
    for rank, res in enumerate(ep_results):
        r = res[activation]
        torch.testing.assert_close(r["m"], full.activations.detach())
        torch.testing.assert_close(r["loss"], full.loss.detach())
        for name, w in weights.items():
            want = w.grad[:, rank * 4:(rank + 1) * 4] if w.grad is not None else torch.zeros(2, 4, *w.shape[2:])
            torch.testing.assert_close(r[f"grad_{name}"] / 2, want)
    torch.testing.assert_close((ep_results[0][activation]["router_grad"] + ep_results[1][activation]["router_grad"]) / 2,
                               router.grad)
