"""Connecting to Ray: the local embedded instance (a laptop, CI) or a cluster (RAY_ADDRESS / --address)."""

from __future__ import annotations

import os
import sys

# Ray gives a local node 30 s (hard-coded) to register with its GCS; a busy 2-core machine can miss it.
START_ATTEMPTS = 3


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start or connect to Ray once per process.

    Local embedded Ray starts lean: no worker prestart (on a 2-core laptop, prestarting one
    Python worker per CPU while Ray's own daemons import made the node miss its 30 s
    registration deadline) and no spot-preemption watcher (one process less; only clusters of
    spot instances need it). The dashboard stays: Ray Train's placement-group cleaner queries
    its State API (without it, it logs a failure every second), and ray[default]'s cleaner needs
    it to free the workers of trials that Tune stops early (shared/stack-notes.md).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance listens on loopback only
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=num_cpus, log_to_driver=True)
            return
        except Exception as err:  # ray raises a bare Exception when the raylet misses its registration window
            if "timed out during startup" not in str(err) or attempt == START_ATTEMPTS:
                raise
            print(f"ercstudy: local Ray was slow to start (machine busy?); retrying ({attempt}/{START_ATTEMPTS - 1})", file=sys.stderr)
            ray.shutdown()
