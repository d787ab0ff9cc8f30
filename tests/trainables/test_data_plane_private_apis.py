"""The private DeepSpeed and Ray APIs that ercstudy.trainables.private_apis relies on are still there.

Each test names what moved; when one fails after an upgrade, fix private_apis.py (and only it)."""

import inspect


def test_deepspeed_expert_group_registry():
    from deepspeed.utils import groups

    for name in ("_get_expert_parallel_group_dict", "_create_expert_and_data_parallel", "_get_expert_parallel_group"):
        assert callable(getattr(groups, name, None)), f"deepspeed.utils.groups.{name} is gone (checked on deepspeed 0.19.8)"
    params = inspect.signature(groups._create_expert_and_data_parallel).parameters
    assert "use_data_before_expert_parallel_" in params, f"_create_expert_and_data_parallel takes {list(params)}"
    assert isinstance(groups._get_expert_parallel_group_dict(), dict)


def test_deepspeed_op_compatibility_table():
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    from ercstudy.trainables import private_apis

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    assert builder is not None and isinstance(builder.NAME, str), "DeepSpeed's CPU accelerator has no ShareMemCommBuilder"
    private_apis.skip_cpu_shm_comm_build()
    table = deepspeed.ops.__dict__.get("__compatible_ops__")
    assert isinstance(table, dict) and table.get(builder.NAME) is False, "deepspeed.ops.__compatible_ops__ changed shape"
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # it reads the table before building the op
    assert "__compatible_ops__" in inspect.getsource(ds_comm), "deepspeed.comm.torch no longer consults __compatible_ops__"


def test_ray_train_report_logger():
    import logging

    from ercstudy.trainables import private_apis

    logger = private_apis.ray_train_report_logger()
    assert logger is not None, "ray.train.v2._internal.execution.context moved (checked on ray 2.60.0)"
    import ray.train.v2._internal.execution.context as context

    assert isinstance(logger, logging.Logger) and logger.name == context.__file__
    source = inspect.getsource(context)
    assert "logging.getLogger(__file__)" in source, "Ray Train's report logger is no longer named by its file path"


def test_deepspeeds_engine_still_keeps_its_checkpoint_engine_and_parsed_config():
    """replace_checkpoint_engine sets the engine's `checkpoint_engine` and builds the new one from its `_config`."""
    import inspect

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine

    source = inspect.getsource(DeepSpeedEngine)
    for attribute in ("self.checkpoint_engine", "self._config"):
        assert attribute in source, f"DeepSpeedEngine has no {attribute} any more: update private_apis.replace_checkpoint_engine"
    assert list(inspect.signature(TorchCheckpointEngine.__init__).parameters)[:2] == ["self", "config_params"]


def test_deepspeed_imports_without_mlflow_and_mlflow_still_imports_after():
    """In a fresh process, as a Train worker imports it: DeepSpeed loads without MLflow (its autotuner still guards
    the import), and MLflow imports afterwards as usual."""
    import os
    import subprocess
    import sys

    probe = ("import sys\nfrom ercstudy.trainables.private_apis import import_deepspeed_without_mlflow\n"
             "import_deepspeed_without_mlflow()\nimport deepspeed.autotuning.autotuner as a\n"
             "print('deepspeed', 'mlflow' in sys.modules, a.has_mlflow)\nimport mlflow\nprint('mlflow', mlflow.__version__ != '')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["deepspeed False False", "mlflow True"], out.stdout
