"""The MoE LM: sizes computed from the config equal the built model, and it learns with ERC."""

import pytest
import torch
from conftest import train_plain

from ercstudy.trainables.erc import erc_loss
from ercstudy.trainables.model import ModelConfig, MoELM, moe_layer_ids, num_active_params, num_params
from ercstudy.trainables.moe import MoEConfig


@pytest.mark.parametrize(
    "model,moe",
    [
        (ModelConfig(), MoEConfig()),
        (ModelConfig(tie_embeddings=True, n_layers=3), MoEConfig(moe_every=2, num_experts=5, top_k=3)),
        (ModelConfig(d_model=64, n_heads=2), MoEConfig(backend="deepspeed", num_experts=4, dense_dim=100, moe_every=2)),
    ],
)
def test_num_params_equals_the_built_model(model, moe):
    built = MoELM(model, moe)
    assert num_params(model, moe) == sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_init_is_the_same_model_for_any_expert_parallel_split(backend):
    """Each rank of an expert-parallel group starts with the same dense weights and router as
    ep_size 1, and global expert r * n_local + j is its local expert j; both backends alike."""
    from ercstudy.trainables.parallelize import parallelize

    model, moe = ModelConfig(d_model=32, n_layers=3, n_heads=2), MoEConfig(num_experts=4, expert_dim=16, moe_every=2, backend=backend)
    whole = parallelize(MoELM(model, moe, seed=7), moe)
    reference = MoELM(model, MoEConfig(num_experts=4, expert_dim=16, moe_every=2), seed=7)  # grouped, ep_size 1
    for rank in range(2):
        part = parallelize(MoELM(model, moe, seed=7), moe, ep_size=2, ep_rank=rank)
        moe_blocks = tuple(f"blocks.{i}.ffn." for i in moe_layer_ids(model, moe))

        def dense(m, moe_blocks=moe_blocks):
            return {k: v for k, v in m.state_dict().items() if not k.startswith(moe_blocks)}

        assert dense(part).keys() == dense(whole).keys() and len(dense(whole)) > 10
        for key, value in dense(whole).items():
            torch.testing.assert_close(dense(part)[key], value, rtol=0, atol=0, msg=key)
        for layer, ref_layer in zip(part.moe_layers, reference.moe_layers):
            ref = ref_layer.expert_weights()
            for name, value in layer.expert_weights().items():
                expected = ref[name] if name == "router" else ref[name][2 * rank : 2 * rank + 2]
                torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)


def test_num_active_params_counts_k_of_n_experts():
    model, moe = ModelConfig(n_layers=2), MoEConfig(num_experts=8, top_k=2, expert_dim=32)
    idle = 2 * 6 * 3 * model.d_model * 32  # 2 MoE layers x 6 idle experts x 3 matrices
    assert num_params(model, moe) - num_active_params(model, moe) == idle


def test_forward_shapes_and_stacked_weights_share_storage_with_parameters():
    model, moe = ModelConfig(n_layers=4, d_model=32, n_heads=2, seq_len=16), MoEConfig(num_experts=4, top_k=2, expert_dim=24, moe_every=2)
    lm = MoELM(model, moe)
    idx = torch.randint(0, model.vocab_size, (3, 16))
    out = lm(idx, idx)
    assert out.logits.shape == (3, 16, model.vocab_size)
    assert out.aux.lb_loss.shape == (2,) and out.aux.tokens_per_expert.shape == (2, 4) and out.aux.experts.shape == (2, 48, 2)
    assert lm.router_weights().shape == (2, 4, 32) and [g.shape for g in lm.gate_weights()] == [(4, 32, 24)] * 2
    # no copy: each gate is a view of its layer's gate_up parameter (gate and up are one grouped GEMM)
    assert all(g._base is layer.experts.gate_up and g.data_ptr() == layer.experts.gate_up.data_ptr()
               for g, layer in zip(lm.gate_weights(), lm.moe_layers))
    erc_loss(lm.router_weights(), lm.gate_weights()).loss.sum().backward()
    for layer in lm.moe_layers:
        assert layer.router.grad is not None
        assert layer.experts.gate_up.grad[..., :24].abs().sum() > 0  # ERC reaches the gate half
        assert layer.experts.gate_up.grad[..., 24:].abs().sum() == 0  # and not the up half


def test_causal_logits_do_not_see_the_future():
    lm = MoELM(ModelConfig(d_model=32, n_heads=2, seq_len=12, n_layers=2), MoEConfig(num_experts=4, top_k=1, expert_dim=16))
    idx = torch.randint(0, 512, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 512
    torch.testing.assert_close(lm(idx).logits[:, :8], lm(changed).logits[:, :8])


def test_training_lowers_the_loss_and_erc_lowers_alpha_star():
    first, last, alpha_off, _ = train_plain(erc_weight=0.0)
    _, last_erc, alpha_on, _ = train_plain(erc_weight=1.0)
    assert last < first - 1.0, (first, last)
    assert last_erc < first - 1.0, (first, last_erc)
    assert alpha_on < alpha_off, (alpha_on, alpha_off)
    assert alpha_on < 1.2  # ERC with alpha = 1 pushes the coupling to (about) 1
