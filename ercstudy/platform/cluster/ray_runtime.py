"""Connecting to Ray: a private local instance (a laptop, CI) or a cluster (RAY_ADDRESS / --address).

The local instance is a `ray start --head --block` child process that ercstudy starts and
stops: nothing to start by hand, and it dies with the driver (SIGTERM on the driver's death).
It differs from a plain `ray.init()` in one way that matters on machines with few, busy CPUs.
Ray 2.60's raylet gives its dashboard agent 15 s (hard-coded) to bind its ports and write them
to files in the session directory, and aborts the node otherwise (ray-project/ray#65983);
importing the agent's Python modules alone can take longer than that when the CPUs are
contended. Here every port is chosen up front, passed on the command line, and written to
those files by us as soon as the session directory exists: the raylet registers at once, and
the agents bind the same ports when they are up.

The terminal belongs to ercstudy: unless `verbose`, the driver does not stream the output of
Ray's processes (workers, DeepSpeed, Train's controller: `log_to_driver=False`), and the log
records of Ray and DeepSpeed in the driver itself go to `ercstudy-driver.log` in the session's
log directory, where the workers' logs are too.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ercstudy.netutil import free_ports
from ercstudy.platform.cluster import private_apis
from ercstudy.platform.cluster.capacity import HEAD_RESOURCE, HEAD_SLOTS

START_TIMEOUT_S = 300.0  # seconds on a laptop; minutes where Ray's daemons compete for few CPUs
DRIVER_LOG = "ercstudy-driver.log"
# where the log records of Ray's and DeepSpeed's code in the driver start (Python warnings too)
RAY_LOGGER = "ray"
DIVERTED_LOGGERS = ("DeepSpeed", "py.warnings")


class RayStartError(RuntimeError):
    """The local Ray instance did not start; the message ends with the tail of its log."""


@dataclass(frozen=True)
class RayLogs:
    """Where the connected Ray keeps its logs, as a command reports it."""

    directory: str | None  # this node's session log directory (None: not known to this process)
    local: bool  # the private local instance (every process logs here) or a cluster (each node its own)

    def where(self) -> str:
        if self.directory is None:
            return "in the session directory of each Ray node (/tmp/ray/session_latest/logs by default)"
        return self.directory + ("" if self.local else " on this node, and in the same place on every node of the cluster")


@dataclass
class LocalRay:
    process: subprocess.Popen
    address: str
    temp_dir: str
    log_path: str
    dashboard_url: str  # the Jobs API (`ercstudy submit --address`) and the web UI
    node_id: str = ""  # fixed at launch, so that its agents' port files can be named before the raylet looks
    agent_ports: dict[str, int] = field(default_factory=dict)  # port-file name -> port, written by wait_started
    token_dir: str | None = None  # the directory of its authentication token, removed when it stops

    def stop(self, *, wait: bool = True) -> None:
        """SIGTERM to `ray start --block`, which stops its Ray processes; `wait`: until they have stopped (seconds)."""
        if self.process.poll() is None:
            self.process.terminate()  # `ray start --block` kills its Ray processes on SIGTERM
            if not wait:
                return
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_local: LocalRay | None = None
_logs: RayLogs | None = None


# `ray start`, run so that it receives SIGTERM when the driver dies (Linux PR_SET_PDEATHSIG) and takes Ray down with it
RAY_START = (
    "import ctypes, runpy, signal, sys\n"
    "try:\n    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\nexcept OSError:\n    pass\n"
    "sys.argv = ['ray'] + sys.argv[1:]\n"
    "runpy.run_module('ray.scripts.scripts', run_name='__main__')\n"
)


def start_local_ray(num_cpus: int | None = None, *, timeout_s: float = START_TIMEOUT_S) -> LocalRay:
    """Start a private head node on loopback; returns once it accepts drivers."""
    local = launch_local_ray(num_cpus, timeout_s=timeout_s)
    wait_started(local, timeout_s=timeout_s)
    return local


def launch_local_ray(num_cpus: int | None = None, *, timeout_s: float = START_TIMEOUT_S) -> LocalRay:
    """Start `ray start --head` for a private head node on loopback and return at once. Call it from the thread that lives as long as the node should: `ray start` gets SIGTERM
    when that thread ends (RAY_START), so never from a short-lived thread."""
    temp_dir = tempfile.mkdtemp(prefix="ercstudy-ray-")  # short: Ray's socket paths must fit in 107 bytes
    node_id = os.urandom(28).hex()
    agent_flags = private_apis.agent_port_names()  # port-file name -> `ray start` flag
    gcs_port, dashboard_port, *agent_ports = free_ports(2 + len(agent_flags))
    ports = dict(zip(agent_flags, agent_ports))
    cmd = [
        sys.executable, "-c", RAY_START, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--resources={json.dumps({HEAD_RESOURCE: HEAD_SLOTS})}",  # the trials' drivers live on the head (capacity.py)
        *(f"{flag}={ports[name]}" for name, flag in agent_flags.items()),
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    # The node id is normally random; fixing it lets us name the port files before the raylet looks for them.
    env = {**os.environ, private_apis.FIXED_NODE_ID_ENV: node_id}
    for key, value in private_apis.private_node_settings(timeout_s).items():  # a user's own setting wins
        env.setdefault(key, value)
    # Ray's own processes find "their" Ray by RAY_ADDRESS, else by looking for one on this machine: with two on it
    # (a second study, the tests' clusters) that lookup fails, e.g. in Ray Train's placement-group cleaner, whose
    # thread then dies and leaves the placement groups of a killed driver's trials holding the CPUs for good.
    # `ray start --head` itself does not read it; every process it starts inherits it.
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    log_path = os.path.join(temp_dir, "ray-start.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return LocalRay(proc, f"127.0.0.1:{gcs_port}", temp_dir, log_path, f"http://127.0.0.1:{dashboard_port}", node_id=node_id,
                    agent_ports=ports)


def wait_started(local: LocalRay, *, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until the launched node accepts drivers, writing its agents' port files as soon as its session directory
    exists (the raylet waits for them)."""
    deadline = time.monotonic() + timeout_s
    written = False
    while True:
        if local.process.poll() is not None:
            raise RayStartError(f"local Ray exited with status {local.process.returncode} while starting; {_log_tail(local)}")
        if time.monotonic() > deadline:
            local.stop()
            raise RayStartError(f"local Ray did not start within {timeout_s:.0f} s; {_log_tail(local)}")
        if not written:
            sessions = [p for p in Path(local.temp_dir).glob("session_*") if p.is_dir() and not p.is_symlink()]
            if sessions:
                for name, port in local.agent_ports.items():
                    private_apis.persist_port(str(sessions[0]), local.node_id, name, port)
                written = True
        if "Ray runtime started" in Path(local.log_path).read_text(errors="replace"):
            return
        time.sleep(0.05 if not written else 0.5)


def _log_tail(local: LocalRay, lines: int = 15) -> str:
    text = Path(local.log_path).read_text(errors="replace").strip().splitlines()
    raylet = sorted(Path(local.temp_dir).glob("session_*/logs/raylet.out"))
    fatal = [ln for p in raylet for ln in p.read_text(errors="replace").splitlines() if " C " in ln[:40]]
    return "log " + local.log_path + ":\n" + "\n".join(text[-lines:] + fatal[-1:])


def new_token_file() -> str:
    """A fresh random token for one private Ray, in a file readable by this user only."""
    import secrets

    directory = tempfile.mkdtemp(prefix="ercstudy-auth-")  # 0700
    path = os.path.join(directory, "auth_token")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    return path


def use_token_if_available(address: str | None = None) -> bool:
    """As a client of a cluster (`ercstudy submit`, `run --address`): when RAY_AUTH_MODE is unset and the user
    has a Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, made by `ray get-auth-token
    --generate`, the file cluster.yaml copies to every node), send it: token mode for this process's clients.
    An explicit RAY_AUTH_MODE is respected. Returns whether the token is used.

    ~/.ray/auth_token alone says little: Ray 2.60 writes one at every plain local `ray.init()`. Sent to a GCS
    without token authentication (`address`, host:port), the connection succeeds but every actor dies as it is
    created ("Actor may be already destroyed"): so with only that file, the cluster is asked first."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    explicit = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not (explicit or os.path.isfile(os.path.expanduser("~/.ray/auth_token"))):
        return False
    if not explicit and address and "://" not in address and address != "auto":
        try:
            if private_apis.gcs_takes_clients_without_a_token(address):
                return False
        except Exception:  # unreachable, or Ray's internals moved: send the token, as before, and let ray.init say why
            pass
    os.environ["RAY_AUTH_MODE"] = "token"
    private_apis.reload_ray_config()
    return True


def enable_token_auth(token_path: str) -> None:
    """Token authentication for the Ray this process starts and for this process's clients of it."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = token_path
    private_apis.reload_ray_config()


class _Starting(threading.Thread):
    """Waits for a launched private Ray (a daemon thread: a driver that exits meanwhile does not wait for it)."""

    def __init__(self, local: LocalRay):
        super().__init__(name="ercstudy-ray-start", daemon=True)
        self.local, self.error = local, None

    def run(self) -> None:
        try:
            _wait_private(self.local)
        except BaseException as err:  # raised by result(), in the thread that connects
            self.error = err

    def result(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


_starting: _Starting | None = None  # the private Ray that `prestart` launched, until ensure_ray has waited for it


def prestart(address: str | None = None) -> None:
    """Launch the private Ray now, where `ensure_ray(address)` would start one, and wait for it in a thread, so that
    its start (seconds of CPU in Ray's own processes) overlaps the driver's own work before it connects (opening the
    tracking store). No-op for a cluster or when this process has its Ray already."""
    global _starting
    import ray

    if address or os.environ.get("RAY_ADDRESS") or ray.is_initialized() or _starting is not None \
            or (_local is not None and _local.process.poll() is None):
        return
    _starting = _Starting(_launch_private(None))  # launched here, in the thread that lives as long as the driver
    _starting.start()


def _launch_private(num_cpus: int | None) -> LocalRay:
    global _local
    for key, value in private_apis.PRIVATE_DRIVER_SETTINGS.items():
        os.environ.setdefault(key, value)
    print("ercstudy: starting a local Ray instance (seconds on a laptop, minutes on a small busy machine)", file=sys.stderr, flush=True)
    # Ray's core servers listen on every interface whatever --node-ip-address says: token authentication makes
    # them, the dashboard and its Jobs API refuse clients without this instance's token (a file only this user can
    # read; this process and Ray's inherit its path)
    token = new_token_file()
    enable_token_auth(token)
    private_apis.reach_ray_on_loopback()  # the node on 127.0.0.1, not the machine's network address
    local = launch_local_ray(num_cpus)
    local.token_dir = os.path.dirname(token)
    _local = local
    # at the driver's exit: Ray stops in the background (a second or three on a small machine), the command returns
    atexit.register(stop_local_ray, wait=False)
    return local


def _wait_private(local: LocalRay) -> None:
    wait_started(local)
    print(f"ercstudy: local Ray is up at {local.address} (dashboard: {local.dashboard_url})", file=sys.stderr, flush=True)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = True) -> RayLogs:
    """Connect to Ray once per process: the cluster at `address` / RAY_ADDRESS, else a private local instance.

    verbose: the output of Ray's processes streams to this terminal (log_to_driver) and Ray's and
    DeepSpeed's log records in this process print as they come; otherwise both go to log files
    only (the returned RayLogs says where).

    The local instance starts lean: no worker prestart (on a machine of a few CPUs, prestarting one
    Python worker per CPU while Ray's own daemons import slows start-up further) and no
    spot-preemption watcher (only clusters of spot instances need it). The dashboard stays:
    Ray Train's placement-group cleaner asks its State API whether a Train controller still lives
    (ray/train/v2/_internal/execution/controller/placement_group_cleaner.py), and so frees the
    workers of trials that Tune stops early.
    """
    global _local, _logs, _starting
    import ray

    if ray.is_initialized():
        return _logs or RayLogs(None, local=False)
    pending = None if verbose else quiet_driver_logs()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        use_token_if_available(address)
    if not address:
        if _starting is not None:  # prestarted: wait for it here, so that a failed start is raised here
            starting, _starting = _starting, None
            starting.result()
        elif _local is None or _local.process.poll() is not None:
            _wait_private(_launch_private(num_cpus))
        address = _local.address
    # A process that the private Ray or its starter started (a job's driver, a test's study) inherits
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and reaches it on loopback by itself (Ray reads it at import); a cluster
    # elsewhere, or on this machine's network address (`ray start --head`, then `--address 127.0.0.1:6379`), is
    # reached as Ray reaches it.
    context = ray.init(address=address, log_to_driver=verbose)
    # ray.init's RayContext: the session directory of this node, where Ray's processes here write their logs
    session_dir = context.address_info.get("session_dir")
    _logs = RayLogs(os.path.join(session_dir, "logs") if session_dir else None, local=address == getattr(_local, "address", None))
    if pending is not None:
        pending.write_to(os.path.join(_logs.directory, DRIVER_LOG) if _logs.directory else None)
        raylet = logging.getLogger(RAY_LOGGER + ".driver_messages")
        private_apis.divert_driver_messages(lambda lines: [raylet.warning(line) for line in lines])
    return _logs


class _DriverLog(logging.Handler):
    """Ray's and DeepSpeed's log records in the driver: held until the log file is known, then written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.file: logging.Handler | None = None
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.handle(record)
        else:
            self.records.append(record)

    def write_to(self, path: str | None) -> None:
        if path is None:
            self.file = logging.NullHandler()
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = logging.FileHandler(path)
            self.file.setFormatter(self.formatter)
        for record in self.records:
            self.file.handle(record)
        self.records.clear()


class _Divert(logging.Filter):
    """A logger filter that hands every record to `handler` and keeps it from the logger's own handlers,
    also from handlers added later (DeepSpeed adds its console handler when it is imported)."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        self.handler.handle(record)
        return False


def quiet_driver_logs() -> _DriverLog:
    """Send the console output of Ray's and DeepSpeed's loggers in this process (and Python warnings,
    and records of loggers without a handler of their own) to one handler instead of the terminal."""
    for module in ("ray.data", "ray.train", "ray.tune"):  # each gives its loggers console handlers when imported
        importlib.import_module(module)

    handler = _DriverLog()
    logging.captureWarnings(True)
    ray_loggers = [RAY_LOGGER, *(n for n in list(logging.root.manager.loggerDict) if n.startswith(RAY_LOGGER + "."))]
    for log in [logging.root, *map(logging.getLogger, (*DIVERTED_LOGGERS, *ray_loggers))]:  # a previous routing's
        for h in [h for h in log.handlers if isinstance(h, _DriverLog)]:
            log.removeHandler(h)
        for f in [f for f in log.filters if isinstance(f, _Divert)]:
            log.removeFilter(f)
    for name in DIVERTED_LOGGERS:
        logging.getLogger(name).addFilter(_Divert(handler))
    # Ray's modules log to children of "ray" (their records reach the handlers of each logger up the
    # tree, past the logger filters): the console handlers that Ray's libraries attached are replaced.
    for name in ray_loggers:
        log = logging.getLogger(name)
        console = [h for h in log.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        for h in console:
            log.removeHandler(h)
        if console or name == RAY_LOGGER:
            log.addHandler(handler)
    if not logging.root.handlers:  # else Python's last-resort handler prints the warnings of loggers without one
        logging.root.addHandler(handler)
    return handler


@contextlib.contextmanager
def ray_session(address: str | None = None, *, verbose: bool = False) -> Iterator[RayLogs]:
    """Connected to Ray inside the block. Leaving it, a connection made here is closed, so that no
    line that Ray streams to this process can print after the block (the local instance itself
    stops when the process exits)."""
    import ray

    owner = not ray.is_initialized()
    logs = ensure_ray(address, verbose=verbose)
    try:
        yield logs
    finally:
        if owner:
            ray.shutdown()


def local_dashboard_url() -> str | None:
    """The dashboard of the local instance this process started (None when connected to a cluster)."""
    return _local.dashboard_url if _local is not None else None


def stop_local_ray(*, wait: bool = True) -> None:
    """Disconnect, and stop the local instance if this process started one; `wait`: until its processes have stopped
    (a process that exits now need not: they stop on their own, as when the driver dies)."""
    global _local, _starting
    import ray

    _starting = None
    ray.shutdown()
    if _local is not None:
        _local.stop(wait=wait)
        if _local.token_dir:
            import shutil

            shutil.rmtree(_local.token_dir, ignore_errors=True)  # the token dies with its instance
        _local = None
