"""Host synchronizations in the training step, counted over whole steps with real DeepSpeed (CPU).

Every call that would block on the device (Tensor.item, .tolist, .cpu, .nonzero, bool(tensor)) is
counted, by the file that made it. The dense path makes none of its own; what DeepSpeed makes is
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

SYNCS = ("item", "tolist", "cpu", "nonzero", "__bool__")
REPO = Path(__file__).resolve().parents[2]  # callers inside the repository are named relative to it


class SyncCounter:
    """Patches torch.Tensor's synchronizing methods; `calls[file] = count` for the callers' files."""

    def __init__(self):
        self.calls = collections.Counter()
        self.saved = {}

    def __enter__(self):
        for name in SYNCS:
            original = self.saved[name] = getattr(torch.Tensor, name)

            def counted(*args, _original=original, **kwargs):
                caller = traceback.extract_stack(limit=2)[0].filename
                self.calls[caller.split("site-packages/")[-1].removeprefix(f"{REPO}/")] += 1
                return _original(*args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def count_syncs(precision: str, backend: str, steps: int = 3) -> collections.Counter:
    from ercstudy.trainables.step import Window, train_step
    from ercstudy.trainables.worker import make_trial

    with single_process_group():
        trial = make_trial(config(backend, precision=precision), rank=0, world=1, device=torch.device("cpu"))
        window = Window.empty(trial.cfg, trial.device, trial.data.num_domains)
        trial.step = 1
        train_step(trial, window, measure_grad_norm=False)  # first step: lazy optimizer state
        with SyncCounter() as counter:
            for _ in range(steps):
                trial.step += 1
                train_step(trial, window, measure_grad_norm=False)
    # torch's AdamW reads its per-parameter step counters with .item(): CPU tensors, no device sync
    counter.calls.pop("torch/optim/optimizer.py", None)
    return counter.calls


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_the_fp32_step_makes_no_host_sync(backend):
    calls = count_syncs("fp32", backend)
    assert calls == {}, calls  # nothing at all: ercstudy, torch and DeepSpeed (its MoE gate included)


def test_the_bf16_step_syncs_twice_in_deepspeeds_optimizer_and_nowhere_else():
    calls = count_syncs("bf16", "grouped", steps=3)
    # BF16_Optimizer.step: is the norm finite (utils.is_invalid_grad_norm), clip or not (clip_tensors_by_global_norm)
    assert calls == {"deepspeed/runtime/utils.py": 2 * 3}, calls


def test_the_counter_sees_a_sync():
    with SyncCounter() as counter:
        torch.ones(2).sum().item()
    assert sum(counter.calls.values()) == 1
