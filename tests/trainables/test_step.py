"""Host synchronizations in the training step, counted over whole steps with real DeepSpeed (CPU).

Every call that would block on the device (Tensor.item, .tolist, .cpu, .nonzero, bool(), int(), float()
of a tensor, and torch.tensor(..., device=...), a copy from the host) is counted, by the file that made it. The dense path makes none of its own; what DeepSpeed makes is
pinned here too, so that a change in either shows up. The expert-parallel path (one exchange of the
split sizes per MoE layer and micro-batch) is counted in tests/trainables/test_parallelize.py.
"""

import collections
import traceback
from pathlib import Path

import pytest
import torch
from conftest import single_process_group
from test_engine import config

SYNCS = ("item", "tolist", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__")
REPO = Path(__file__).resolve().parents[2]  # callers inside the repository are named relative to it


class SyncCounter:
    """Patches torch.Tensor's synchronizing methods; `calls[file] = count` for the callers' files."""

    def __init__(self):
        self.calls = collections.Counter()
        self.saved = {}

    def count(self) -> None:
        caller = traceback.extract_stack(limit=3)[0].filename
        self.calls[caller.split("site-packages/")[-1].removeprefix(f"{REPO}/")] += 1

    def __enter__(self):
        for name in SYNCS:
            original = self.saved[name] = getattr(torch.Tensor, name)

            def counted(*args, _original=original, **kwargs):
                self.count()
                return _original(*args, **kwargs)

            setattr(torch.Tensor, name, counted)
        make = self.saved["tensor"] = torch.tensor

        def tensor(*args, _make=make, **kwargs):
            if kwargs.get("device") is not None:  # Python data copied to a device: blocking from pageable memory
                self.count()
            return _make(*args, **kwargs)

        torch.tensor = tensor
        return self

    def __exit__(self, *exc):
        torch.tensor = self.saved.pop("tensor")
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def count_syncs(precision: str, backend: str, steps: int = 3, device: str = "cpu", detected: list | None = None) -> collections.Counter:
    """Host syncs of `steps` training steps after a first one, by file. With `detected` (a CUDA device), CUDA's own
    sync detector runs over the same steps and its warnings are appended there."""
    import contextlib
    import warnings

    from ercstudy.trainables.step import Window, train_step
    from ercstudy.trainables.worker import make_trial

    with single_process_group():
        trial = make_trial(config(backend, precision=precision), rank=0, world=1, device=torch.device(device))
        window = Window.empty(trial.cfg, trial.device, trial.data.num_domains)
        trial.step = 1
        train_step(trial, window, measure_grad_norm=False)  # first step: lazy optimizer state
        detect = contextlib.nullcontext([]) if detected is None else warnings.catch_warnings(record=True)
        with SyncCounter() as counter, detect as seen:
            if detected is not None:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    trial.step += 1
                    train_step(trial, window, measure_grad_norm=False)
            finally:
                if detected is not None:
                    torch.cuda.set_sync_debug_mode("default")
                    detected += [w for w in seen if "synchroniz" in str(w.message)]
    # torch's AdamW reads its per-parameter step counters with .item(): CPU tensors, no device sync
    counter.calls.pop("torch/optim/optimizer.py", None)
    return counter.calls


MOE_LAYERS, MICRO_BATCHES = 2, 2  # test_engine.config: 2 layers, global batch 8 of micro-batches of 4


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_the_fp32_step_syncs_only_in_deepspeeds_clipping_and_moe_gate(backend):
    calls = count_syncs("fp32", backend)
    # clip_grad_norm_ (deepspeed/runtime/utils.py:422,424) makes its max_norm and a 1.0 from Python numbers on the
    # device, each step; ercstudy's own code and torch make none
    expected = {"deepspeed/runtime/utils.py": 2 * 3}
    if backend == "deepspeed":  # MOELayer.forward resolves the gate's capacity, int(C), per MoE layer and micro-batch
        expected["deepspeed/moe/sharded_moe.py"] = MOE_LAYERS * MICRO_BATCHES * 3
    assert calls == expected, calls


def test_the_bf16_step_syncs_three_times_in_deepspeeds_optimizer_and_nowhere_else():
    calls = count_syncs("bf16", "grouped", steps=3)
    # BF16_Optimizer.step: is the norm finite (utils.is_invalid_grad_norm), a -1.0 made on the device for the
    # error value (utils.py:887), clip or not (clip_tensors_by_global_norm's `clip_coef < 1`)
    assert calls == {"deepspeed/runtime/utils.py": 3 * 3}, calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_counter_agrees_with_cudas_own_sync_detector():
    """On a GPU, torch's sync debug mode is the ground truth: it warns at every synchronizing call."""
    detected: list = []
    counted = count_syncs("bf16", "grouped", steps=3, device="cuda", detected=detected)
    assert len(detected) == sum(counted.values()), ([str(w.message)[:80] for w in detected], counted)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_workers_system_metrics_hold_the_memory_in_use_on_its_device():
    """What the MLflow UI's System metrics tab shows for a GPU trial: the device's memory in use, this tensor's included."""
    from ercstudy.trainables.devices import system_metrics

    held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    metrics = system_metrics(torch.device("cuda", 0))
    assert metrics["system/gpu_0_memory_usage_megabytes"] >= held.numel() / 1e6
    assert 0 < metrics["system/gpu_0_memory_usage_percentage"] <= 100


def test_the_counter_sees_every_kind_of_sync():
    with SyncCounter() as counter:
        x = torch.ones(2)
        x.sum().item(), int(x[0]), float(x[1]), bool(x[0]), x.tolist(), [1, 2][x[0].long()]
        torch.tensor([1.0], device="cpu"), torch.tensor([1.0])  # the second stays on the host: not counted
    assert sum(counter.calls.values()) == 7 and set(counter.calls) == {"tests/trainables/test_step.py"}, counter.calls
