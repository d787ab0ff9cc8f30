"""Autonomy-of-Experts (trainables/aoe.py) against a float64 reference written from the AoE paper's algorithm, one
token and one expert at a time; its parameters matched to the routed layer's; its FLOPs counted by hand."""

import pytest
import torch
import torch.nn.functional as F

from ercstudy.trainables.aoe import AoEMoE, matched_rank
from ercstudy.trainables.moe import GroupedMoE, MoEConfig


def layer(n, k, d, D, seed=0):
    moe = AoEMoE(MoEConfig(num_experts=n, top_k=k, expert_dim=D), d)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe


def reference(x, gate_down, gate_up, up, down, k):
    """Per token: every expert's activation a_e = x W_down^e and its norm; softmax over the norms; the top-k experts,
    their probabilities renormalised; out = sum of weight * (silu(a_e W_up^e) * (x up_e)) down_e."""
    outs = []
    for t in range(x.shape[0]):
        acts = [x[t] @ gate_down[e] for e in range(gate_down.shape[0])]
        probs = torch.softmax(torch.stack([a.norm() for a in acts]), dim=0)
        top = torch.topk(probs, k).indices.tolist()
        weights = probs[top] / probs[top].sum() if k > 1 else probs[top]
        outs.append(sum(w * ((F.silu(acts[e] @ gate_up[e]) * (x[t] @ up[e])) @ down[e]) for w, e in zip(weights, top)))
    return torch.stack(outs)


@pytest.mark.parametrize("n,k,d,D,T", [(4, 2, 16, 8, 12), (6, 1, 24, 16, 9)])
def test_forward_and_gradients_equal_the_papers_algorithm_in_float64(n, k, d, D, T):
    moe = layer(n, k, d, D)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out, stats = moe(x)
    weights = [moe.gate_down, moe.gate_up, moe.up, moe.down]
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, *weights)]
    ref = reference(ref_inputs[0], *ref_inputs[1:], k)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((out * probe).sum(), (x, *weights))
    ref_grads = torch.autograd.grad((ref * probe.double()).sum(), ref_inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert stats.tokens_per_expert.sum() == T * k and stats.experts_TK.shape == (T, k)
    assert torch.isfinite(stats.lb_loss) and torch.isfinite(stats.z_loss)


@pytest.mark.parametrize("d,D", [(64, 64), (256, 128), (1536, 768), (2048, 1024)])
def test_the_matched_rank_gives_the_routed_layers_parameter_count_within_1_percent(d, D):
    cfg = MoEConfig(num_experts=8, top_k=2, expert_dim=D)
    routed = sum(p.numel() for p in GroupedMoE(cfg, d).parameters())
    aoe = sum(p.numel() for p in AoEMoE(cfg, d).parameters())
    assert matched_rank(d, D) % 8 == 0 and abs(aoe - routed) / routed < 0.01, (aoe, routed)


def test_flops_per_token_count_the_pre_computation_for_every_expert():
    moe = AoEMoE(MoEConfig(num_experts=8, top_k=2, expert_dim=32), 48, rank=16)
    by_hand = 2 * 8 * 48 * 16 + 2 * 2 * (16 * 32 + 48 * 32 + 32 * 48)  # all 8 pre-compute; 2 continue
    assert moe.flops_per_token() == by_hand


def aoe_config(**changes):
    from ercstudy.trainables.config import TrialConfig

    spec = {
        "model": {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32},
        "moe": {"kind": "aoe", "num_experts": 4, "top_k": 2, "expert_dim": 32},
        "erc": {"enabled": False},
        "train": {"tokens": 8 * 8 * 32, "global_batch_size": 8, "micro_batch_size": 4, "lr": 0.01, "warmup_steps": 1,
                  "report_every": 4, "checkpoint_every": 8, "seed": 1},
        "eval": {"sequences": 0, "mc_items": 0},
        "data": {"num_domains": 4, "tokens_per_domain": 16, "shared_tokens": 16},
    }
    for section, values in changes.items():
        spec[section] = {**spec.get(section, {}), **values}
    return TrialConfig.from_dict(spec)


@pytest.mark.parametrize("changes,path", [
    ({"erc": {"enabled": True}}, "erc.enabled"),
    ({"moe": {"backend": "deepspeed"}}, "moe.kind"),
    ({"resources": {"ep_size": 2, "num_workers": 2}}, "resources.ep_size"),
    ({"moe": {"aoe_rank": 12}}, "moe.aoe_rank"),
])
def test_aoe_is_refused_where_it_has_no_meaning(changes, path):
    from ercstudy.trainables.validation import ConfigError

    with pytest.raises(ConfigError) as err:
        aoe_config(**changes)
    assert str(err.value).startswith(path), str(err.value)


def test_the_model_counts_aoes_parameters_and_flops_as_built():
    from ercstudy.trainables.model import MoELM

    cfg = aoe_config()
    model = MoELM(cfg.model, cfg.moe)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    layer = model.moe_layers[0]
    expert = sum(p[0].numel() for p in (layer.gate_down, layer.gate_up, layer.up, layer.down))
    idle = (4 - 2) * (expert - layer.gate_down[0].numel())  # every expert's gate_down works for every token
    assert cfg.num_active_params() == cfg.num_params() - cfg.num_moe_layers * idle


def test_the_dry_runs_memory_counts_every_experts_pre_computed_activation():
    from ercstudy.trainables.config import TrialConfig

    aoe = aoe_config()
    routed = TrialConfig.from_dict({**aoe.to_dict(), "moe": {**aoe.to_dict()["moe"], "kind": "routed"}})
    from ercstudy.trainables.aoe import matched_rank

    rank = matched_rank(32, 32)
    tokens = aoe.train.micro_batch_size * aoe.model.seq_len
    extra = aoe.num_moe_layers * tokens * aoe.moe.num_experts * rank * 4  # fp32 on CPU
    assert aoe.activation_memory(gpu=False) - routed.activation_memory(gpu=False) == extra


def test_an_aoe_trial_trains_and_reports_its_coupling_from_its_own_activations():
    """Through the training step and the report, as a worker runs them: no router metrics, M from the activations."""
    from conftest import single_process_group

    from ercstudy.trainables.step import Window, train_step
    from ercstudy.trainables.worker import make_trial, window_metrics

    cfg = aoe_config()
    with single_process_group():
        trial = make_trial(cfg, rank=0, world=1, device=torch.device("cpu"))
        window = Window.empty(cfg, trial.device, trial.data.num_domains)
        for _ in range(4):
            trial.step += 1
            train_step(trial, window, measure_grad_norm=True)
        metrics = window_metrics(trial, window)
    assert not {"eps_mean", "eps_min", "router_cos"} & set(metrics)
    assert metrics["peak_memory_mb"] > 10  # this process's peak resident set on a CPU
    # the machine, in MLflow's system-metric names (its UI's System metrics tab)
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > metrics["peak_memory_mb"]
    assert 0 < metrics["system/system_memory_usage_percentage"] < 100
    assert metrics["erc_loss"] == 0 and all(torch.isfinite(torch.tensor(metrics[k])) for k in ("lm_loss", "lb_loss", "alpha_star"))
    # the first-chosen expert has the largest activation on its own tokens: the diagonal dominates every row
    assert metrics["diag_dominance"] >= 1 and 0 < metrics["domain_nmi"] <= 1
    assert window.coupling[..., -1].sum() == 4 * cfg.train.global_batch_size * cfg.model.seq_len * cfg.num_moe_layers
