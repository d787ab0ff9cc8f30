"""What the connected cluster can hold, and what a trial needs of it beside its workers (runner.concurrency refuses
a study that never fits; trial.run_trial an `ercstudy train` trial)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ercstudy.platform.cluster import private_apis


@dataclass(frozen=True)
class Capacity:
    cpus: float
    gpus: float
    autoscaling: bool
    gpu_types: tuple[str, ...] = ()  # the GPU types Ray names (accelerator_type:<type>) on its nodes now or at most


ACCELERATOR = "accelerator_type:"


def gpu_types(*resources: dict[str, float]) -> tuple[str, ...]:
    """The GPU types in Ray resource dicts (a node publishes `accelerator_type:<type>` for its GPUs)."""
    return tuple(sorted({k[len(ACCELERATOR):] for r in resources for k in r if k.startswith(ACCELERATOR)}))


def cluster_capacity() -> Capacity:
    """What the connected cluster has now, or could have once its autoscaler adds nodes."""
    import ray

    now = ray.cluster_resources()
    cpus, gpus = now.get("CPU", 0.0), now.get("GPU", 0.0)
    try:
        most = private_apis.autoscaler_max_resources()
        unknown_largest = not most and private_apis.autoscaler_running()
    except Exception:  # a Ray whose internals moved (tests/platform/cluster/test_private_apis.py names it): today's resources only
        most, unknown_largest = {}, False
    if unknown_largest:  # Ray's v1 autoscaler: it adds nodes, but does not say how many it may (Ray Train checks nothing then either)
        return Capacity(float("inf"), float("inf"), True)
    return Capacity(max(cpus, most.get("CPU", 0)), max(gpus, most.get("GPU", 0)), bool(most), gpu_types(now, most))


# A custom resource that the head node declares (cluster.yaml's head type, the private local Ray): a study's trial
# drivers ask a sliver of it, to live on the head (study/driver.py), as Ray's Train-inside-Tune guide pins them. A
# cluster that does not declare it (KubeRay, a user's own) pins them by Ray's internal head resource instead.
HEAD_RESOURCE = "ercstudy_head"
HEAD_SLOTS = 1000  # how much of it the head declares: trial drivers at once (each asks 1 / HEAD_SLOTS)


def head_pin() -> dict[str, float]:
    """The resource request that places an actor on the connected cluster's head node."""
    import ray

    name = HEAD_RESOURCE if HEAD_RESOURCE in ray.cluster_resources() else private_apis.HEAD_NODE_RESOURCE
    return {name: 1 / HEAD_SLOTS}


# CPUs left free beside the trials when Ray Data reads the shards (data.reader: ray_data): it lists and samples the
# files in tasks of one CPU, which a cluster whose CPUs the trials hold never runs (the trials would wait for good)
RAY_DATA_CPUS = 1


def cpu_need(worker_cpus: float, data: Any) -> tuple[float, float, str]:
    """What a trial whose workers hold `worker_cpus` needs of the cluster's CPUs with its DataConfig `data`: the
    total, the part kept free for Ray Data's reads, and the need in words."""
    spare = RAY_DATA_CPUS if data.kind == "parquet" and data.reader == "ray_data" else 0
    words = f"{worker_cpus:g} CPU(s)"
    if spare:
        words += f" and {spare:g} left free for Ray Data's reads (data.reader: ray_data; `direct` needs none)"
    return worker_cpus + spare, spare, words
