"""Connecting to Ray: a private local instance (a laptop, CI) or a cluster (RAY_ADDRESS / --address).

The local instance is a `ray start --head --block` child process that ercstudy starts and
stops: nothing to start by hand, and it dies with the driver (SIGTERM on the driver's death).
It differs from a plain `ray.init()` in one way that matters on slow machines. Ray 2.60's
raylet gives its dashboard agent 15 s (hard-coded) to bind its ports and write them to files
in the session directory, and aborts the node otherwise (ray-project/ray#65983). Importing
the agent's Python modules alone took 10-35 s of CPU on our 2-core CI machine, so
`ray.init()` failed there three times in a row. Here every port is chosen up front, passed
on the command line, and written to those files by us as soon as the session directory
exists: the raylet registers at once, and the agents bind the same ports when they are up.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 300.0  # a cold 2-core machine takes 1-2 minutes; a laptop a few seconds
# ports the raylet waits for (files `<name>_<node id>` in the session directory), and their `ray start` flags
AGENT_PORTS = {
    "metrics_agent_port": "--dashboard-agent-grpc-port",
    "metrics_export_port": "--metrics-export-port",
    "dashboard_agent_listen_port": "--dashboard-agent-listen-port",
    "runtime_env_agent_port": "--runtime-env-agent-port",
}


class RayStartError(RuntimeError):
    """The local Ray instance did not start; the message ends with the tail of its log."""


@dataclass
class LocalRay:
    process: subprocess.Popen
    address: str
    temp_dir: str
    log_path: str
    dashboard_url: str  # the Jobs API (`ercstudy submit --address`) and the web UI

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # `ray start --block` kills its Ray processes on SIGTERM
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_local: LocalRay | None = None


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# `ray start`, run so that it receives SIGTERM when the driver dies (Linux PR_SET_PDEATHSIG) and takes Ray down with it
RAY_START = (
    "import ctypes, runpy, signal, sys\n"
    "try:\n    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\nexcept OSError:\n    pass\n"
    "sys.argv = ['ray'] + sys.argv[1:]\n"
    "runpy.run_module('ray.scripts.scripts', run_name='__main__')\n"
)


def _write_port_file(session_dir: Path, name: str, node_id: str, port: int) -> None:
    tmp = session_dir / f".{name}_{node_id}.tmp"
    tmp.write_text(str(port))
    tmp.replace(session_dir / f"{name}_{node_id}")


def start_local_ray(num_cpus: int | None = None, *, timeout_s: float = START_TIMEOUT_S) -> LocalRay:
    """Start a private head node on loopback; returns once it accepts drivers."""
    temp_dir = tempfile.mkdtemp(prefix="ercstudy-ray-")  # short: Ray's socket paths must fit in 107 bytes
    node_id = os.urandom(28).hex()
    gcs_port, dashboard_port, *agent_ports = free_ports(2 + len(AGENT_PORTS))
    ports = dict(zip(AGENT_PORTS, agent_ports))
    cmd = [
        sys.executable, "-c", RAY_START, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        *(f"{flag}={ports[name]}" for name, flag in AGENT_PORTS.items()),
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    # The node id is normally random; fixing it lets us name the port files before the raylet looks for them.
    env = {**os.environ, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id}
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", str(int(timeout_s)))  # Ray's default, 60 s, is too short there too
    # One node: the GCS health check of its own raylet can only kill it. On a starved 2-core machine
    # it did (5 checks of 10 s missed in a row, mid-study); allow minutes instead.
    env.setdefault("RAY_health_check_timeout_ms", "30000")
    env.setdefault("RAY_health_check_failure_threshold", "60")
    # A worker process that has not registered within 60 s (Ray's default) is given up on and another
    # one started while the first goes on importing: on a starved 2-core machine that cascaded (66
    # give-ups in one test session, hundreds of runnable threads, a Ray Data read past 30 minutes).
    env.setdefault("RAY_worker_register_timeout_seconds", "600")
    # On SIGTERM `ray start --block` drains the node first, for up to 30 s while any worker lease is
    # held (for Serve replicas behind a load balancer). A private node that is going away has
    # nothing to hand over: it made every `ercstudy run` / `train` end 30 s late.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    env.pop("RAY_ADDRESS", None)
    log_path = os.path.join(temp_dir, "ray-start.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    local = LocalRay(proc, f"127.0.0.1:{gcs_port}", temp_dir, log_path, f"http://127.0.0.1:{dashboard_port}")
    deadline = time.monotonic() + timeout_s
    written = False
    while True:
        if proc.poll() is not None:
            raise RayStartError(f"local Ray exited with status {proc.returncode} while starting; {_log_tail(local)}")
        if time.monotonic() > deadline:
            local.stop()
            raise RayStartError(f"local Ray did not start within {timeout_s:.0f} s; {_log_tail(local)}")
        if not written:
            sessions = [p for p in Path(temp_dir).glob("session_*") if p.is_dir() and not p.is_symlink()]
            if sessions:
                for name, port in ports.items():
                    _write_port_file(sessions[0], name, node_id, port)
                written = True
        if "Ray runtime started" in Path(log_path).read_text(errors="replace"):
            return local
        time.sleep(0.05 if not written else 0.5)


def _log_tail(local: LocalRay, lines: int = 15) -> str:
    text = Path(local.log_path).read_text(errors="replace").strip().splitlines()
    raylet = sorted(Path(local.temp_dir).glob("session_*/logs/raylet.out"))
    fatal = [ln for p in raylet for ln in p.read_text(errors="replace").splitlines() if " C " in ln[:40]]
    return "log " + local.log_path + ":\n" + "\n".join(text[-lines:] + fatal[-1:])


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process: the cluster at `address` / RAY_ADDRESS, else a private local instance.

    The local instance starts lean: no worker prestart (on a 2-core laptop, prestarting one
    Python worker per CPU while Ray's own daemons import slowed start-up further) and no
    spot-preemption watcher (only clusters of spot instances need it). The dashboard stays:
    Ray Train's placement-group cleaner queries its State API, and it frees the workers of
    trials that Tune stops early (shared/stack-notes.md).
    """
    global _local
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the local instance listens on loopback only
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if _local is None or _local.process.poll() is not None:
        print("ercstudy: starting a local Ray instance (a few seconds on a laptop, up to minutes on a busy 2-core machine)", file=sys.stderr, flush=True)
        _local = start_local_ray(num_cpus)
        atexit.register(stop_local_ray)
        print(f"ercstudy: local Ray is up at {_local.address} (dashboard: {_local.dashboard_url})", file=sys.stderr, flush=True)
    ray.init(address=_local.address, log_to_driver=True)


def local_dashboard_url() -> str | None:
    """The dashboard of the local instance this process started (None when connected to a cluster)."""
    return _local.dashboard_url if _local is not None else None


def stop_local_ray() -> None:
    """Disconnect, and stop the local instance if this process started one."""
    global _local
    import ray

    ray.shutdown()
    if _local is not None:
        _local.stop()
        _local = None
