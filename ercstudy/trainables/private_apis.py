"""Every private API of DeepSpeed and Ray that the data plane uses, in one place (tests/test_private_api_fence.py
finds any other use).

Each has no public counterpart in the versions checked (deepspeed 0.19.8, ray 2.60.0); each is
used only through this module, and tests/trainables/test_data_plane_private_apis.py (its canaries) fails loudly, naming the
attribute, when an upgrade moves or removes one.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any


def expert_parallel_group(ep_size: int, *, use_data_before_expert_parallel: bool = False) -> Any:
    """DeepSpeed's expert-parallel process group for `ep_size`, created (with its expert-data-parallel
    groups) on first use. deepspeed.moe.layer.MoE.set_deepspeed_parallelism does exactly this for
    DeepSpeed's own layers (deepspeed/moe/layer.py, `_create_process_groups`); our GroupedEPMoE must
    join the same groups so that the engine reduces and checkpoints its experts as DeepSpeed's."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    return groups._get_expert_parallel_group(name)


def import_deepspeed_without_mlflow() -> None:
    """Import DeepSpeed without the MLflow import its autotuner makes at import time when MLflow is installed
    (deepspeed/autotuning/autotuner.py: `try: import mlflow ... except ImportError`), about 1.2 s of CPU in every
    Train worker, none of which uses MLflow (the driver logs). Blocking the name for the length of the import makes
    that `import mlflow` raise ImportError (the autotuner, unused here, then runs without MLflow); the block is lifted
    afterwards, so that a later `import mlflow` in the process works as usual."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return
    sys.modules["mlflow"] = None  # type: ignore[assignment]
    try:
        import deepspeed  # noqa: F401
    finally:
        del sys.modules["mlflow"]


def skip_cpu_shm_comm_build() -> None:
    """Let DeepSpeed on CPU use plain gloo collectives instead of JIT-compiling its shared-memory op.

    The op takes minutes to compile, on the first run of every fresh machine, and only speeds up
    CPU all-reduces between workers of one node. DeepSpeed keeps its op-compatibility table as a
    module-level dict (deepspeed/ops/__init__.py, `__compatible_ops__`, probed lazily on first access);
    marking the op incompatible makes deepspeed.comm skip it. Setting the dict before anything reads
    it also skips the probe, which runs compiler subprocesses; deepspeed.comm.torch is its only reader
    in 0.19.8. Set ERCSTUDY_DS_SHM_COMM=1 to build and use the op anyway.
    """
    if os.environ.get("ERCSTUDY_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        ops = deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})
        ops[builder.NAME] = False


def ray_train_report_logger() -> logging.Logger | None:
    """The logger under which Ray Train's worker logs every report, all metrics included, at INFO.

    Ray 2.60 names it by the file path of ray/train/v2/_internal/execution/context.py, so
    RunConfig's LoggingConfig(log_level), which filters `ray.train.*`, does not reach it.
    None if another Ray lays its modules out differently (its logs then stay as they are).
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return None
    return logging.getLogger(context.__file__)


def persist_checkpoint(checkpoint: Any, dir_name: str) -> Any:
    """Ray Train's own copy of a local checkpoint directory into the run's storage (local, NFS, S3), as
    `ray.train.report` does when given no `checkpoint_upload_fn`; for an upload function that first waits
    for its files (checkpoint_writer.py). The StorageContext is a DeveloperAPI of ray 2.60
    (`TrainContext.get_storage()`, "may change without notice between minor versions")."""
    import ray.train

    return ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)


def replace_checkpoint_engine(engine: Any, engine_class: Any) -> None:
    """Make a DeepSpeed engine save through `engine_class` (a TorchCheckpointEngine subclass) instead of its own.

    DeepSpeed picks its checkpoint engine from its config alone (torch, Nebula, decoupled) and offers no way to
    hand it one; its engine keeps the one it uses in `checkpoint_engine` and builds them from its private parsed
    config (deepspeed/runtime/engine.py, `_configure_checkpointing`), which the new engine is given as well.
    """
    engine.checkpoint_engine = engine_class(getattr(engine, "_config", None))
