"""Every private API of Ray and Optuna that the control plane relies on, in one place, for want of a public one:
internal functions, the head node's internal resource, and Ray's internal settings (RAY_* variables that its
documentation does not give users).

Checked against ray 2.60.0 and optuna 5.0. tests/platform/cluster/test_private_apis.py fails, naming the
internal, when one of them moves or changes its signature: update this module (and the versions above) then;
tests/test_private_api_fence.py fails when a private name is used anywhere else.
"""

from __future__ import annotations

import json
from typing import Any

CHECKED_RAY = "2.60.0"
CHECKED_OPTUNA = "5.0"

# Ray's internal resource of its head node (ray/_private/ray_constants.py HEAD_NODE_RESOURCE_NAME): the trial's
# driver actor asks a sliver of it to run on the head (study/driver.py TRIAL_ACTOR). The public way, a custom
# resource that the cluster config declares on the head, is used where a cluster declares it (HEAD_RESOURCE).
HEAD_NODE_RESOURCE = "node:__internal_head__"


def private_node_settings(timeout_s: float) -> dict[str, str]:
    """Ray's internal settings for a private single-node Ray (cluster/ray_runtime.py), as `ray start` reads them
    from its environment."""
    return {
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(int(timeout_s)),  # Ray's default, 60 s, is short on a busy machine
        # One node: the GCS health check of its own raylet can only kill it, when the raylet is slow to
        # answer (Ray's default: 5 missed checks of 10 s) because the CPUs are busy training; allow minutes.
        "RAY_health_check_timeout_ms": "30000",
        "RAY_health_check_failure_threshold": "60",
        # A worker process that has not registered within 60 s (Ray's default) is given up on and another
        # one started while the first goes on importing; when importing is slow because the CPUs are
        # contended, every new start makes it slower still, a cascade of duplicate workers.
        "RAY_worker_register_timeout_seconds": "600",
        # On SIGTERM `ray start --block` drains the node first, for up to 30 s while any worker lease is
        # held (for Serve replicas behind a load balancer). A private node that is going away has
        # nothing to hand over: it made every `ercstudy run` / `train` end 30 s late.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # No Prometheus exporter on the node's agent: a private node has no Prometheus to feed, and the
        # exporter listens on every interface and answers without the token.
        "RAY_enable_metrics_collection": "0",
    }


# The driver's own internal settings on a private Ray: no worker prestarted for it (it runs no tasks of its own),
# and no preemption watcher in Ray Train's controller (a laptop is never preempted; the watcher polls the GCS).
PRIVATE_DRIVER_SETTINGS = {"RAY_prestart_worker_first_driver": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Ray Train's workers: a worker's prints go to its log once, not twice (stdout + Train's logger).
WORKER_SETTINGS = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def without_datasets_callback(trainer: Any) -> Any:
    """`trainer` (a TorchTrainer given no datasets) without Ray Train's datasets callback, which every run gets and
    which starts a DatasetManager actor per run whether or not there are datasets
    (ray/train/v2/api/data_parallel_trainer.py `_create_default_callbacks`, ray/train/v2/_internal/callbacks/datasets.py):
    a Ray process per trial, about 1.7 s of CPU, for nothing. The workers read their data themselves
    (trainables/data.py), the `ray_data` reader included."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    if trainer.datasets:
        return trainer
    defaults = trainer._create_default_callbacks
    trainer._create_default_callbacks = lambda: [cb for cb in defaults() if not isinstance(cb, DatasetsCallback)]
    return trainer


def optuna_trial_id(trial: Any) -> int:
    """An Optuna Trial's id in its storage, which `optuna.Trial(study, trial_id)` takes to rebuild it (the searcher's
    pickle holds ids, not trials). Optuna has only `number` publicly, and no public way from a number to a Trial."""
    return trial._trial_id


def autoscaler_max_resources() -> dict[str, float]:
    """The most of each resource the connected cluster can have once its autoscaler has added every
    node its config allows ({} without an autoscaler, e.g. a local Ray).

    Ray has no public API for it; Ray Train's worker group and Ray Data's autoscaler ask the same
    private method (ray/train/v2/_internal/execution/worker_group/worker_group.py).
    """
    from ray._private.state import state

    return dict(state.get_max_resources_from_cluster_config() or {})


def autoscaler_running() -> bool:
    """Whether an autoscaler runs on the connected cluster, known or not its largest size: Ray's v1 autoscaler
    (the cluster launcher's default) publishes its status in the GCS's internal KV every update
    (ray/autoscaler/_private/monitor.py, DEBUG_AUTOSCALING_STATUS), but not the cluster config that
    `autoscaler_max_resources` reads (only autoscaler v2 and KubeRay do)."""
    import ray
    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return False
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = json.loads(status).get("autoscaler_report") if status else None
    if not report:
        return False
    # a head started without an autoscaling config runs a read-only "autoscaler" that lists every live node as
    # active under a type of its own (format_readonly_node_type); a real one reports its config's node types
    readonly = {format_readonly_node_type(n["NodeID"]) for n in ray.nodes()}
    active = report.get("active_nodes") or {}
    return not (active and all(node_type in readonly for node_type in active))


# `ray start` starts a node under a random node id unless this variable fixes it; Ray names it for its
# own tests (ray/_private/node.py reads it), and it is the only way to know the id before the node runs.
FIXED_NODE_ID_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"


def agent_port_names() -> dict[str, str]:
    """The node's agent ports that its raylet waits for, as Ray names their port files -> their `ray start` flag."""
    from ray import _raylet

    return {
        _raylet.METRICS_AGENT_PORT_NAME: "--dashboard-agent-grpc-port",
        _raylet.METRICS_EXPORT_PORT_NAME: "--metrics-export-port",
        _raylet.DASHBOARD_AGENT_LISTEN_PORT_NAME: "--dashboard-agent-listen-port",
        _raylet.RUNTIME_ENV_AGENT_PORT_NAME: "--runtime-env-agent-port",
    }


def persist_port(session_dir: str, node_id: str, name: str, port: int) -> None:
    """Write a port file in the node's session directory as the agent itself would once it is up
    (ray/dashboard/agent.py calls the same function), so that the raylet need not wait for the agent."""
    from ray import _raylet

    _raylet.persist_port(str(session_dir), node_id, name, port)


def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """A cluster-launcher config with Ray's defaults filled in for its provider, validated as `ray up`
    validates it (the schema ray/autoscaler/ray-schema.json plus Ray's own checks), without a cloud call.

    `ray.autoscaler.sdk.fillout_defaults` is public but does only the first part; `ray up` calls these two.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(config)
    validate_config(config)
    return config


def divert_driver_messages(write: Any) -> None:
    """Hand the messages Ray pushes to every driver (the raylet's warnings, e.g. "N worker processes have
    been started ..."), which it prints to stdout whatever `log_to_driver` says, to `write(lines)` instead.

    ray._private.worker.listen_error_messages prints them through the module function
    `print_to_stdstream(data, ignore_prefix)`; replacing that function is the only way to route them.
    """
    import ray._private.worker as worker

    def to_driver_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        write([f"({data.get('pid', 'ray')}) {line}" for line in data.get("lines", [])])

    worker.print_to_stdstream = to_driver_log


def reload_ray_config() -> None:
    """Make this process's Ray read its settings from the environment again (RAY_AUTH_MODE above all).

    Ray caches them when it is imported; ray.init does not read them again, so a process that imported
    Ray before choosing token authentication would connect without its token. Ray's own
    `ray._private.authentication.authentication_token_setup._enable_token_auth` does the same.
    """
    from ray._raylet import Config

    Config.initialize("")


def gcs_takes_clients_without_a_token(address: str, timeout_s: float = 5.0) -> bool:
    """Whether the GCS at `address` (host:port) answers a client that sends no token: a cluster without token
    authentication. This process must not be in token mode when it asks. No public API says a cluster's
    authentication mode; Ray's internal GcsClient refuses at once (AuthenticationError) where a token is needed."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        GcsClient(address=address).internal_kv_keys(b"", None, timeout=timeout_s)
    except AuthenticationError:
        return False
    return True


LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def reach_ray_on_loopback() -> None:
    """Address Ray as a one-machine Ray on 127.0.0.1, in this process and the Ray it starts (the environment).

    Ray resolves 127.0.0.1 (`--node-ip-address`, a driver's address) to the machine's network address, and its
    node then registers there and its dashboard's and autoscaler's Prometheus endpoints listen on every interface
    (ray/dashboard/head.py, ray/autoscaler/v2/monitor.py bind loopback only for a loopback node). It does not
    when its clusters are off, as on a macOS or Windows laptop (ray/_private/services.py get_node_ip_address):
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray reads once, at import (ray_constants.ENABLE_RAY_CLUSTER)."""
    import os

    from ray._private import ray_constants

    os.environ[LOOPBACK_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
