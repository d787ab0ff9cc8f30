"""Checkpoints that do not stall training: when to take one, and writing it behind the step.

At the paper's 3B shape one checkpoint is ~39 GiB (fp32 masters, Adam moments, bf16 module). Written
synchronously, every save stalls every GPU for tens of seconds. Here a save costs the step only a copy
of each rank's state into host memory:

1. `HostSnapshotEngine` is DeepSpeed's checkpoint engine (the `engine.checkpoint_engine` that
   `save_checkpoint` hands every state dict to: module, ZeRO/BF16 optimizer shards, one file per
   expert). Its `save` copies the tensors to host memory (the snapshot, taken at the step the
   checkpoint belongs to: training then updates the parameters in place) and queues `torch.save` of
   the snapshot on a background thread.
2. `CheckpointWriter.report` hands the checkpoint directory to `ray.train.report` with
   `checkpoint_upload_mode=ASYNC` and an upload function that first waits for the background writes
   of this checkpoint, then lets Ray copy the directory to the run's storage (local disk, NFS, S3)
   and delete the local copy. Ray delivers reports in order, so a checkpoint is registered (and
   training can resume from it) only once it is whole in storage; a worker that dies before that
   resumes from the checkpoint before.
3. One checkpoint in flight: the next save first waits until the previous one has reached storage,
   so host memory holds at most one snapshot per rank.

`CheckpointSchedule` says when to save: every `train.checkpoint_every` steps when set, else every
`train.checkpoint_minutes` of training (rank 0's clock, broadcast so that every rank saves at the same
step, as DeepSpeed's collective save needs), and always at the last step.
"""

from __future__ import annotations

import copy
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from ercstudy.trainables import private_apis
from ercstudy.trainables.config import TrainConfig


def host_snapshot(obj: Any, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """A copy of a (nested) state dict whose tensors live in host memory, detached from the live ones.

    Containers are copied (their types kept: OrderedDict, defaultdict), tensors copied to the CPU
    (one tensor held twice in the state stays one tensor), everything else kept as is.
    """
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().to("cpu", copy=True)
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for key, value in obj.items():
            out[key] = host_snapshot(value, memo)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(host_snapshot(v, memo) for v in obj)
    return obj


class HostSnapshotEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, with each `save` a host snapshot and a queued write."""

    def __init__(self, config_params: Any = None):
        super().__init__(config_params)
        self.name = "ercstudy.HostSnapshotEngine"
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ercstudy-checkpoint-write")
        self._pending: list[Future] = []

    def save(self, state_dict: Any, path: str) -> None:
        snapshot = host_snapshot(state_dict)
        self._pending.append(self._writer.submit(torch.save, snapshot, path,
                                                 _use_new_zipfile_serialization=self.zipfile_serialization))

    def take_pending(self) -> list[Future]:
        """The writes queued since the last call (this checkpoint's files)."""
        pending, self._pending = self._pending, []
        return pending


def wait_written(pending: list[Future]) -> None:
    """Block until these writes are done; raises the first write error (disk full, ...)."""
    for future in pending:
        future.result()


class CheckpointWriter:
    """One worker's checkpoints: DeepSpeed saves into a local temporary directory, Ray uploads it."""

    def __init__(self, engine: Any, *, asynchronous: bool):
        self.asynchronous = asynchronous
        self._uploaded = threading.Event()
        self._uploaded.set()  # nothing in flight yet
        if asynchronous:
            private_apis.replace_checkpoint_engine(engine, HostSnapshotEngine)
        self.engine = engine
        self.last_save_s: float | None = None  # how long the last save held the training step

    @property
    def upload_mode(self) -> Any:
        import ray.train

        return ray.train.CheckpointUploadMode.ASYNC if self.asynchronous else ray.train.CheckpointUploadMode.SYNC

    def report(self, metrics: dict[str, Any], save: Any) -> None:
        """Save a checkpoint with `save(directory)` (DeepSpeed's collective save, plus extras) and report it
        with `metrics`. Asynchronous: returns once the state is in host memory."""
        import ray.train

        started = time.perf_counter()
        self._uploaded.wait()  # one checkpoint in flight: the previous one is in storage
        directory = tempfile.mkdtemp(prefix="ercstudy-checkpoint-")
        save(directory)
        pending = self.engine.checkpoint_engine.take_pending() if self.asynchronous else []
        self._uploaded.clear()
        uploaded = self._uploaded

        def upload(checkpoint: Any, dir_name: str) -> Any:
            try:
                wait_written(pending)
                return private_apis.persist_checkpoint(checkpoint, dir_name)
            finally:
                uploaded.set()

        self.last_save_s = time.perf_counter() - started
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_upload_mode=self.upload_mode, delete_local_checkpoint_after_upload=True,
                         checkpoint_upload_fn=upload)

    def wait_uploaded(self) -> None:
        """Block until the checkpoint in flight, if any, is in storage."""
        self._uploaded.wait()

    def report_metrics(self, metrics: dict[str, Any]) -> None:
        """A report without a checkpoint; asynchronous too, so it does not wait behind an upload in flight."""
        import ray.train

        ray.train.report(metrics, checkpoint_upload_mode=self.upload_mode)


class CheckpointSchedule:
    """Which reporting steps take a checkpoint: every `checkpoint_every` steps, or (unset) every
    `checkpoint_minutes` of training by rank 0's clock, and the last step."""

    def __init__(self, train: TrainConfig, last_step: int, *, device: torch.device, world: int):
        self.every, self.seconds = train.checkpoint_every, train.checkpoint_minutes * 60.0
        self.last_step, self.device, self.world = last_step, device, world
        self.since = time.monotonic()

    def due(self, step: int) -> bool:
        """Called at every reporting step, on every rank (a broadcast when the interval is a time)."""
        if step == self.last_step:
            return True
        if self.every is not None:
            return step % self.every == 0
        due = time.monotonic() - self.since >= self.seconds
        if self.world > 1 and dist.is_initialized():
            flag = torch.tensor([float(due)], device=self.device)
            dist.broadcast(flag, src=0)  # rank 0's clock decides for all: the save is a collective
            due = bool(flag.item())
        return due

    def saved(self) -> None:
        self.since = time.monotonic()
