"""The canaries of the control plane's private-API fence (platform/cluster/private_apis.py): the Ray and Optuna
internals it wraps are still there, with the signatures it calls them with. A failure names the internal."""

import inspect
import os
import tempfile

import pytest

from ercstudy.platform.cluster import private_apis


def _signature(func, where):
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        pytest.fail(f"{where} has no readable signature any more (Ray {_ray_version()}; private_apis.py was checked "
                    f"against {private_apis.CHECKED_RAY})")


def _ray_version():
    import ray

    return ray.__version__


def _require(module, name, where):
    if not hasattr(module, name):
        pytest.fail(f"{where}.{name} is gone in Ray {_ray_version()} (private_apis.py was checked against {private_apis.CHECKED_RAY})")
    return getattr(module, name)


def test_autoscaler_max_resources_is_asked_as_before():
    from ray._private import state

    gcs_state = _require(state, "state", "ray._private.state")
    method = _require(type(gcs_state), "get_max_resources_from_cluster_config", "ray._private.state.GlobalState")
    params = list(_signature(method, "GlobalState.get_max_resources_from_cluster_config").parameters)
    assert params == ["self"], f"GlobalState.get_max_resources_from_cluster_config now takes {params}; private_apis.py calls it without arguments"


def test_autoscaler_status_is_read_as_before():
    from ray._private import ray_constants
    from ray.autoscaler._private import monitor, util

    _require(ray_constants, "DEBUG_AUTOSCALING_STATUS", "ray._private.ray_constants")
    _require(util, "format_readonly_node_type", "ray.autoscaler._private.util")
    source = inspect.getsource(monitor)
    assert 'status["autoscaler_report"]' in source and "DEBUG_AUTOSCALING_STATUS" in source, \
        "Ray's monitor no longer publishes its autoscaler report under DEBUG_AUTOSCALING_STATUS (private_apis.autoscaler_running)"


def test_the_datasets_callback_is_dropped_as_before():
    """Ray Train still makes its default callbacks in `_create_default_callbacks`, the datasets callback among them,
    and a trainer without datasets loses exactly that one (private_apis.without_datasets_callback)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    def make():
        return TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))

    default = [type(cb) for cb in make()._create_default_callbacks()]
    assert DatasetsCallback in default, "Ray Train no longer adds its DatasetsCallback by default (private_apis.without_datasets_callback)"
    lean = [type(cb) for cb in private_apis.without_datasets_callback(make())._create_default_callbacks()]
    assert lean == [t for t in default if t is not DatasetsCallback]


@pytest.mark.ray
def test_a_head_without_an_autoscaling_config_has_no_autoscaler(ray_session):
    """The private Ray's head runs Ray's read-only monitor: no autoscaler that could add nodes (the study's resource
    check then refuses what does not fit; tests/integration/test_autoscaling.py has a real autoscaler)."""
    import time

    deadline = time.monotonic() + 30
    while private_apis.autoscaler_running() is False and time.monotonic() < deadline:
        time.sleep(1)  # give the monitor a chance to publish a report: it must never look like an autoscaler
        if time.monotonic() > deadline - 25:
            break
    assert private_apis.autoscaler_running() is False


def test_the_node_id_override_is_still_read_by_ray():
    import ray._private.node as node

    source = inspect.getsource(node)
    assert private_apis.FIXED_NODE_ID_ENV in source, (
        f"ray/_private/node.py no longer reads {private_apis.FIXED_NODE_ID_ENV}: the local Ray's node id cannot be fixed in advance, "
        "so its port files cannot be written before the raylet waits for them (ray_runtime.start_local_ray)")


def test_port_files_are_written_where_ray_reads_them():
    from ray import _raylet

    for name in ("METRICS_AGENT_PORT_NAME", "METRICS_EXPORT_PORT_NAME", "DASHBOARD_AGENT_LISTEN_PORT_NAME", "RUNTIME_ENV_AGENT_PORT_NAME"):
        _require(_raylet, name, "ray._raylet")
    persist = _require(_raylet, "persist_port", "ray._raylet")
    wait = _require(_raylet, "wait_for_persisted_port", "ray._raylet")
    params = list(_signature(persist, "ray._raylet.persist_port").parameters)
    assert params == ["dir", "node_id", "port_name", "port"], f"ray._raylet.persist_port now takes {params}"
    # round trip: what compat writes is what the raylet's reader finds
    node_id = os.urandom(28).hex()
    with tempfile.TemporaryDirectory() as d:
        for i, name in enumerate(private_apis.agent_port_names()):
            private_apis.persist_port(d, node_id, name, 40000 + i)
            assert wait(d, node_id, name, timeout_ms=1000) == 40000 + i, name
    flags = set(private_apis.agent_port_names().values())
    assert flags == {"--dashboard-agent-grpc-port", "--metrics-export-port", "--dashboard-agent-listen-port", "--runtime-env-agent-port"}


def test_ray_start_still_takes_the_agent_port_flags():
    from ray.scripts import scripts

    options = {opt for p in scripts.start.params for opt in p.opts}
    missing = set(private_apis.agent_port_names().values()) - options
    assert not missing, f"`ray start` no longer takes {sorted(missing)} (Ray {_ray_version()})"


def test_cluster_config_validation_is_where_it_was():
    from ray.autoscaler._private import util

    for name in ("prepare_config", "validate_config"):
        params = list(_signature(_require(util, name, "ray.autoscaler._private.util"), f"util.{name}").parameters)
        assert params == ["config"], f"ray.autoscaler._private.util.{name} now takes {params}"


def test_driver_messages_are_printed_through_a_replaceable_module_function():
    import inspect

    import ray._private.worker as worker

    assert callable(getattr(worker, "print_to_stdstream", None)), "ray._private.worker.print_to_stdstream is gone"
    source = inspect.getsource(worker.listen_error_messages)
    assert "print_to_stdstream(" in source, "listen_error_messages no longer prints through print_to_stdstream"
    saved, seen = worker.print_to_stdstream, []
    try:
        private_apis.divert_driver_messages(seen.extend)
        worker.print_to_stdstream({"lines": ["a warning"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    finally:
        worker.print_to_stdstream = saved
    assert seen == ["(raylet) a warning"]


def test_ray_config_can_be_reloaded_from_the_environment():
    from ray._raylet import Config

    assert callable(getattr(Config, "initialize", None)), "ray._raylet.Config.initialize is gone"
    import ray._private.authentication.authentication_token_setup as setup

    assert "Config.initialize" in inspect.getsource(setup._enable_token_auth), "Ray enables token auth differently now"
    private_apis.reload_ray_config()


@pytest.mark.ray
def test_a_token_cluster_is_told_apart_by_a_client_without_one(ray_session, tmp_path):
    """The tests' Ray needs its token: a process that has none set (only a ~/.ray/auth_token, as every plain
    ray.init() of Ray 2.60 leaves) is refused by it at once, and so decides to send the token. (The multinode
    scenario's driver has such a file too and a cluster without tokens: it connects without one.)"""
    import subprocess
    import sys

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0" * 64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    code = ("import sys; from ercstudy.platform.cluster import private_apis, ray_runtime as r; a = sys.argv[1]; "
            "print(private_apis.gcs_takes_clients_without_a_token(a), r.use_token_if_available(a))")
    out = subprocess.run([sys.executable, "-c", code, ray_session.get_runtime_context().gcs_address], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr[-2000:]


def _ray_files():
    from pathlib import Path

    import ray

    root = Path(ray.__file__).parent
    return root, {p: p.read_text(errors="ignore") for p in root.rglob("*.py")}


def test_every_internal_setting_is_still_read_by_ray():
    """Ray's internal settings that the private Ray and its driver set: an upper-case one is read by Ray's Python
    (ray_constants, Ray Train's constants), a lower-case one is a RayConfig entry (in the compiled raylet)."""
    root, sources = _ray_files()
    raylet = next(root.glob("_raylet*.so")).read_bytes()
    settings = {**private_apis.private_node_settings(60), **private_apis.PRIVATE_DRIVER_SETTINGS, **private_apis.WORKER_SETTINGS}
    assert len(settings) == 9
    for name in settings:
        key = name.removeprefix("RAY_")
        found = key.encode() in raylet if key.islower() else any(name in text for text in sources.values())
        assert found, f"{name}: Ray {_ray_version()} reads it no more (checked against {private_apis.CHECKED_RAY}): drop or rename it"


def test_the_head_nodes_internal_resource_is_still_named_so():
    _, sources = _ray_files()
    assert any(private_apis.HEAD_NODE_RESOURCE in text for text in sources.values()), \
        f"{private_apis.HEAD_NODE_RESOURCE} is gone in Ray {_ray_version()}: pin the trial drivers by capacity.HEAD_RESOURCE only"


def test_an_optuna_trial_is_rebuilt_from_its_id(tmp_path):
    import optuna

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    again = optuna.Trial(study, private_apis.optuna_trial_id(trial))
    assert again.number == trial.number and again.params == trial.params, f"optuna {optuna.__version__}: update optuna_trial_id"
