"""Checkpoints behind the step: host snapshots that later training cannot change, writes whose errors surface,
and the schedule by steps or by time. (Real DeepSpeed saves through this engine in tests/trainables/test_parallelize.py,
and every Ray Train trial of tests/integration/test_trial.py checkpoints, resumes and uploads through it.)"""

import collections
import time

import pytest
import torch

from ercstudy.trainables.checkpoint_writer import CheckpointSchedule, HostSnapshotEngine, host_snapshot, wait_written
from ercstudy.trainables.config import TrainConfig


def test_host_snapshot_copies_tensors_and_keeps_the_structure():
    shared = torch.arange(4.0)
    state = collections.OrderedDict(a=shared, b={"tied": shared, "n": 3, "shape": torch.Size([2, 2])},
                                    c=[torch.ones(2), (torch.zeros(1), "x")], d=collections.defaultdict(list, k=[1]))
    snap = host_snapshot(state)
    shared.add_(100.0)  # training goes on, in place
    assert type(snap) is collections.OrderedDict and type(snap["d"]) is collections.defaultdict
    assert snap["a"].tolist() == [0.0, 1.0, 2.0, 3.0] and snap["b"]["tied"] is snap["a"]  # one tensor stays one
    assert snap["b"]["n"] == 3 and snap["b"]["shape"] == torch.Size([2, 2]) and isinstance(snap["c"][1], tuple)
    assert snap["c"][0] is not state["c"][0] and not snap["a"].requires_grad


def test_the_engine_writes_the_state_of_the_save_not_of_later_steps(tmp_path):
    engine = HostSnapshotEngine()
    weight = torch.nn.Parameter(torch.full((3,), 1.0))
    engine.save({"w": weight}, str(tmp_path / "a.pt"))
    with torch.no_grad():
        weight.mul_(5.0)  # the next optimizer step, before the write is done
    wait_written(engine.take_pending())
    assert torch.load(tmp_path / "a.pt", weights_only=True)["w"].tolist() == [1.0, 1.0, 1.0]
    assert engine.take_pending() == []


def test_a_failed_write_surfaces_when_waited_for(tmp_path):
    engine = HostSnapshotEngine()
    engine.save({"w": torch.ones(1)}, str(tmp_path / "missing-dir" / "a.pt"))
    with pytest.raises(OSError, match="missing-dir"):
        wait_written(engine.take_pending())


def test_schedule_by_steps_and_by_time():
    cpu = torch.device("cpu")
    by_steps = CheckpointSchedule(TrainConfig(report_every=5, checkpoint_every=10), 25, device=cpu, world=1)
    assert [s for s in (5, 10, 15, 20, 25) if by_steps.due(s)] == [10, 20, 25]
    by_time = CheckpointSchedule(TrainConfig(report_every=5, checkpoint_minutes=0.5), 25, device=cpu, world=1)
    assert [s for s in (5, 10, 15, 20) if by_time.due(s)] == []  # 30 s have not passed
    assert by_time.due(25)  # the last step always saves
    by_time.since = time.monotonic() - 31.0
    assert by_time.due(15)
    by_time.saved()
    assert not by_time.due(20)
    assert TrainConfig().checkpoint_every is None and TrainConfig().checkpoint_minutes == 10.0  # by time unless set


def test_config_refuses_a_crash_without_a_step_checkpoint_before_it():
    from ercstudy.trainables.config import TrialConfig
    from ercstudy.trainables.validation import ConfigError

    with pytest.raises(ConfigError, match="crash_at_step"):
        TrialConfig.from_dict({"train": {"crash_at_step": 30}})
    base = {"tokens": 40 * 32 * 256, "global_batch_size": 32, "checkpoint_every": 10, "report_every": 10, "crash_in": "eval"}
    with pytest.raises(ConfigError, match="crash_in"):  # step 30 has no evaluation (eval.every 0: the last step only)
        TrialConfig.from_dict({"model": {"seq_len": 256}, "train": {**base, "crash_at_step": 30}})
    assert TrialConfig.from_dict({"model": {"seq_len": 256}, "train": {**base, "crash_at_step": 40}}).steps == 40
