"""The bf16 engine through real DeepSpeed on CPU: fp32 master weights and gradient accumulation,
clipping by the norm of every gradient (experts included), micro-batching that does not change the
update, and a bf16 loss that follows the fp32 one."""

import math

import pytest
import torch
from conftest import single_process_group

from ercstudy.trainables.config import TrialConfig

pytestmark = pytest.mark.timeout(900)


def config(backend="grouped", precision="bf16", lb_weight=0.01, **train) -> TrialConfig:
    return TrialConfig.from_dict({
        "model": {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32},
        "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32, "backend": backend, "lb_weight": lb_weight},
        "erc": {"alpha": 0.5},
        "train": {"tokens": 30 * 8 * 32, "global_batch_size": 8, "micro_batch_size": 4, "lr": 0.01, "warmup_steps": 2,
                  "report_every": 5, "checkpoint_every": 10, "seed": 1, "precision": precision, "grad_clip": 1.0, **train},
        "eval": {"sequences": 0, "mc_items": 0},
        "data": {"num_domains": 4, "tokens_per_domain": 16, "shared_tokens": 16},
    })


def full_grads(model):
    from deepspeed.utils import safe_get_full_grad

    return {name: safe_get_full_grad(p) for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_bf16_keeps_fp32_masters_accumulation_and_buffers(backend):
    from ercstudy.trainables.engine import build_engine

    with single_process_group():
        built = build_engine(config(backend), torch.device("cpu"), rank=0)
        engine, model = built.deepspeed, built.model
        assert type(engine.optimizer).__name__ == "BF16_Optimizer"
        inner = engine.optimizer.optimizer  # the torch AdamW stepping the fp32 masters: fused, one kernel for all
        assert type(inner) is torch.optim.AdamW and all(g["fused"] for g in inner.param_groups)
        assert engine.get_data_types() == (torch.bfloat16, torch.float32)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32  # RoPE tables stay exact
        assert {t.dtype for t in engine.optimizer.fp32_groups_flat_partition} == {torch.float32}  # master weights
        assert {t.dtype for t in engine.optimizer.fp32_groups_gradients_flat} == {torch.float32}  # accumulated grads
        tokens = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(0))
        out = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(out.lm_loss)
        grads = full_grads(model)
        assert all(g is not None and g.dtype == torch.float32 for g in grads.values())


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_clip_norm_and_reported_grad_norm_cover_every_parameter(backend):
    """Two micro-batches; the norm DeepSpeed clips by (and the trial reports) is the norm of all the
    accumulated gradients, expert weights included, computed here by hand."""
    from ercstudy.trainables.step import Window, train_step
    from ercstudy.trainables.worker import make_trial, window_metrics

    with single_process_group():
        trial = make_trial(config(backend), rank=0, world=1, device=torch.device("cpu"))
        engine, model = trial.engine, trial.model
        seen = {}
        step = engine.step

        def step_after_measuring():
            grads = full_grads(model)
            seen["all"] = math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))
            seen["dense"] = math.sqrt(sum(g.double().square().sum().item() for n, g in grads.items() if "expert" not in n))
            step()

        engine.step = step_after_measuring
        trial.step = 1
        window = Window.empty(trial.cfg, trial.device, trial.data.num_domains)
        train_step(trial, window, measure_grad_norm=True)
        gap = seen["all"] - seen["dense"]  # what the experts' gradients add to the norm
        assert gap > 1e-4
        assert engine.get_global_grad_norm() == pytest.approx(seen["all"], abs=gap / 20)
        assert window_metrics(trial, window)["grad_norm"] == pytest.approx(seen["all"], abs=gap / 20)


@pytest.mark.parametrize("precision,rel", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_micro_batches_give_the_gradient_of_one_batch_erc_included(precision, rel):
    """The accumulated gradient the optimizer steps with (LM, load-balancing, z and ERC losses) is the
    same for 2 micro-batches of 4 sequences as for 1 of 8 (Adam's first update is about sign(g), so the
    gradient is what to compare). The load-balancing loss is left out: it is a product of batch means,
    defined per micro-batch, so it differs between the two by construction."""
    from ercstudy.trainables.step import Window, train_step
    from ercstudy.trainables.worker import make_trial

    grads = {}
    for micro in (4, 8):
        with single_process_group():
            cfg = config(precision=precision, lb_weight=0.0, micro_batch_size=micro)
            trial = make_trial(cfg, rank=0, world=1, device=torch.device("cpu"))
            step = trial.engine.step

            def capture(micro=micro, step=step, model=trial.model, engine=trial.engine):
                if engine.is_gradient_accumulation_boundary():
                    grads[micro] = {n: g.double() for n, g in full_grads(model).items()}
                step()

            trial.engine.step = capture
            trial.step = 1
            train_step(trial, Window.empty(trial.cfg, trial.device, trial.data.num_domains), measure_grad_norm=False)
    assert grads[4].keys() == grads[8].keys() and any("router" in n or "wg" in n for n in grads[8])
    for name, g in grads[8].items():
        assert g.norm() > 0, name
        assert (grads[4][name] - g).norm() <= rel * g.norm(), name


def test_bf16_loss_tracks_fp32_over_30_steps():
    from ercstudy.trainables.worker import make_trial, train

    histories = {}
    for precision in ("fp32", "bf16"):
        with single_process_group():
            trial = make_trial(config(precision=precision), rank=0, world=1, device=torch.device("cpu"))
            train(trial, lambda *a, **k: None)
            histories[precision] = [m["lm_loss"] for m in trial.history]
    fp32, bf16 = histories["fp32"], histories["bf16"]
    assert len(fp32) == len(bf16) == 6 and fp32[-1] < fp32[0] - 0.3
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=0.03)


def test_deepspeed_is_told_the_workers_one_device():
    """With several GPUs per worker, cuda:LOCAL_RANK is not the worker's GPU: DeepSpeed gets the device chosen once."""
    from ercstudy.trainables.engine import deepspeed_args

    assert deepspeed_args(torch.device("cuda", 3)).device_rank == 3  # no GPU needed: only the index is read
    assert deepspeed_args(torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_engine_trains_on_the_device_it_was_given():
    from ercstudy.trainables.engine import build_engine

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    with single_process_group():
        built = build_engine(config("grouped"), device, rank=0)
        assert built.deepspeed.device == device and {p.device for p in built.model.parameters()} == {device}


def test_a_worker_state_is_20_bytes_a_parameter_in_bf16_and_a_trial_too_large_for_its_gpu_is_refused():
    from ercstudy.trainables.engine import check_fits

    cfg = config("grouped")
    # one worker: bf16 weights and grads, fp32 accumulated grads, fp32 masters and two Adam moments
    assert cfg.state_memory(gpu=True) == 20 * cfg.num_params() and cfg.state_memory(gpu=False) == 16 * cfg.num_params()
    assert cfg.memory_per_worker(gpu=True) == cfg.state_memory(gpu=True) + cfg.activation_memory(gpu=True)
    two = TrialConfig.from_dict({**cfg.to_dict(), "resources": {"num_workers": 2}, "train": {**cfg.to_dict()["train"], "micro_batch_size": 2}})
    assert two.state_memory(gpu=True) == (8 + 12 / 2) * cfg.num_params()  # masters and moments sharded over 2
    check_fits(cfg, 80 * 2**30, "NVIDIA H100 80GB HBM3")
    with pytest.raises(ValueError, match=r"resources: a worker of this trial needs about .* its GPU \(tiny\) has 0.0 GiB"):
        check_fits(cfg, 2**20, "tiny")
