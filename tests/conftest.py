"""Shared test set-up: CPU DeepSpeed, one embedded Ray instance for the tests that need it."""

import contextlib
import functools
import os
import re
import sys
from pathlib import Path

# DeepSpeed reads its accelerator once, at the first get_accelerator(): CPU for the whole suite.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The S3-compatible server of the storage tests (moto's standalone server, started once by the `s3` fixture) and
# its credentials, in the standard variables boto3 and pyarrow read: set before any Ray starts, so that every Ray
# worker process inherits them as a cluster node inherits its environment.
from ercstudy.netutil import free_port  # noqa: E402

S3_ENDPOINT = os.environ.get("ERCSTUDY_TEST_S3_ENDPOINT") or f"http://127.0.0.1:{free_port()}"  # a scenario: its session's
os.environ["ERCSTUDY_TEST_S3_ENDPOINT"] = S3_ENDPOINT
for _key, _value in {"AWS_ENDPOINT_URL": S3_ENDPOINT, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[_key] = _value

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread in the test process itself: the background scenarios run beside it on 2 cores, and torch's
# default threads (one per core) spin against them (the bf16 learning test: 17 s -> 9 s). Set here, not through
# OMP_NUM_THREADS, which would reach every Ray process: runs with it there were where a trial hang was first seen
# (README, Status).
torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------
# Background scenarios: the cluster tests' whole runs (a cluster of their own, a study on it, a fault), each in a
# process of its own, one after another from as soon as the session has collected them. Most of their minutes are
# waits on Ray (nodes, worker processes, the autoscaler), not CPU: they overlap the rest of the suite instead of
# adding to it, and one at a time they leave the suite's own tests most of the machine.
# A test marked @pytest.mark.background("name") runs tests/integration/scenarios/name.py; the `scenario` fixture waits for it
# and returns the dict it wrote (its result.json), or fails with the tail of its log.

SCENARIOS = Path(__file__).resolve().parent / "integration" / "scenarios"


class _Scenario:
    def __init__(self, name: str):
        import tempfile
        import threading

        self.name, self.proc, self.done = name, None, threading.Event()
        self.span: list[float] = []  # seconds from the session's collection: when it started, when it ended
        self.out = Path(tempfile.mkdtemp(prefix=f"ercstudy-{name}-"))


_background: dict[str, _Scenario] = {}
_stopping: list = []
_collected: list[float] = []  # when collection finished (time.monotonic)
_waited: dict[str, float] = {}  # scenario -> seconds from collection to when its first test began waiting on it


def _run_in_turn(scenarios: list) -> None:
    import subprocess
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "PYTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(SCENARIOS.parents[2]), str(SCENARIOS.parents[1])])  # the repository, tests/
    for sc in scenarios:
        if not _stopping:
            with (sc.out / "scenario.log").open("w") as log:
                # at a low CPU priority (Ray's processes inherit it): the suite's own tests come first, the scenario
                # takes what they leave
                sc.proc = subprocess.Popen(["nice", "-n", "10", sys.executable, str(SCENARIOS / f"{sc.name}.py"), str(sc.out)], env=env,
                                           cwd=sc.out, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                sc.span.append(time.monotonic() - _collected[0])
                sc.proc.wait()
                sc.span.append(time.monotonic() - _collected[0])
        sc.done.set()


def pytest_collection_modifyitems(session, config, items):
    """The tests of background scenarios run last: by then their scenarios have had the whole suite's time."""
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)  # stable: the order otherwise kept


def pytest_collection_finish(session):
    import threading
    import time

    _collected.append(time.monotonic())

    marks = [m for item in session.items for m in item.iter_markers("background")]
    if not marks or session.config.option.collectonly:
        return
    if any(m.kwargs.get("s3") for m in marks):
        start_s3_server()
    for m in marks:  # in the order their tests run
        if m.args[0] not in _background:
            _background[m.args[0]] = _Scenario(m.args[0])
    threading.Thread(target=_run_in_turn, args=(list(_background.values()),), daemon=True, name="scenarios").start()


def pytest_terminal_summary(terminalreporter):
    """When each scenario ran, and when the suite's tests began waiting on it: where the session's minutes went."""
    if _background:
        terminalreporter.write_sep("-", "background scenarios (seconds from collection)")
        for sc in _background.values():
            span = " to ".join(f"{t:.0f}" for t in sc.span) or "never started"
            waited = f", waited on from {_waited[sc.name]:.0f}" if sc.name in _waited else ""
            terminalreporter.write_line(f"{sc.name}: ran {span}{waited}")


def pytest_sessionfinish(session):
    import shutil
    import signal

    for proc in _s3:
        proc.terminate()
        proc.wait(timeout=30)
    _stopping.append(True)
    for sc in _background.values():
        if sc.proc is not None and sc.proc.poll() is None:  # a test that never waited for it (-x): nothing outlives the session
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sc.proc.pid, signal.SIGKILL)
        sc.done.wait(timeout=60)
        shutil.rmtree(sc.out, ignore_errors=True)


@pytest.fixture
def scenario(request) -> dict:
    """The result of the test's background scenario, once it has finished (see pytest_collection_finish)."""
    import json
    import time

    sc = _background[request.node.get_closest_marker("background").args[0]]
    _waited.setdefault(sc.name, time.monotonic() - _collected[0])
    timeout = request.node.get_closest_marker("timeout")
    log = sc.out / "scenario.log"
    if not sc.done.wait(timeout=(timeout.args[0] if timeout else 1800) - 30):
        pytest.fail(f"scenario {sc.name} still running:\n{log.read_text()[-4000:] if log.exists() else ''}", pytrace=False)
    text = log.read_text() if log.exists() else ""
    if sc.proc is None or sc.proc.returncode != 0 or not (sc.out / "result.json").is_file():
        pytest.fail(f"scenario {sc.name} failed (exit {sc.proc and sc.proc.returncode}):\n{text[-6000:]}", pytrace=False)
    print(text[-2000:])  # its own account (timings), in the test's captured output
    return json.loads((sc.out / "result.json").read_text())


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state (torch, numpy, random): no test depends on luck."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray instance for every test that needs it (starting Ray costs a minute on 2 cores)."""
    import ray

    from ercstudy.platform.cluster.ray_runtime import ensure_ray, stop_local_ray

    ensure_ray()
    yield ray
    stop_local_ray()


_s3: list = []  # the S3 server's process, once started


def start_s3_server() -> str:
    """A real S3-compatible server on loopback for the whole session: moto's standalone server (pure Python, from
    PyPI, starts in about a second; MinIO would need a binary download). Started once; returns its endpoint URL."""
    import subprocess
    import time
    import urllib.request

    if _s3:
        return S3_ENDPOINT
    port = S3_ENDPOINT.rsplit(":", 1)[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(S3_ENDPOINT, timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the moto S3 server did not start on {S3_ENDPOINT}", pytrace=False)
            time.sleep(0.2)
    _s3.append(proc)
    return S3_ENDPOINT


@pytest.fixture(scope="session")
def s3_server():
    """The session's S3 server (start_s3_server): yields its endpoint URL."""
    return start_s3_server()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh, empty bucket on the session's S3 server, named after the test. Yields "s3://<name>"."""
    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback for the session (postgres_server.py); a test makes its own databases.
    Without PostgreSQL installed the tests that need it are skipped on a developer's machine and fail in CI."""
    from postgres_server import PostgresMissing, PostgresServer

    try:
        server = PostgresServer()
    except PostgresMissing as err:
        if os.environ.get("CI"):
            pytest.fail(str(err), pytrace=False)
        pytest.skip(str(err))
    server.start()
    yield server
    server.stop()


# A line Ray streams from its processes to the driver's stderr, e.g. "(raylet) ..." or "(TrainController pid=1) ...",
# possibly colored: once the shared Ray runs, such lines reach any test that captures stderr.
RAY_STREAMED = re.compile(r"^(\x1b\[[0-9;]*m)?\([^()]*\)(\x1b\[0m)? ")


def own_stderr(text: str) -> str:
    """Captured stderr without the lines Ray streamed into it from its own processes."""
    return "\n".join(line for line in text.splitlines() if not RAY_STREAMED.match(line)).strip()


# what every report of a trial holds (besides per-layer copies and eval/ metrics)
TRIAL_METRICS = ["lm_loss", "lb_loss", "z_loss", "erc_loss", "grad_norm", "lr", "tokens_per_s", "eps_mean", "eps_min",
                 "alpha_star", "diag_dominance", "router_cos", "load_entropy", "load_max_over_mean", "dropped", "domain_nmi"]

# Real text shipped with the tests (fixtures/README.md): the first and the last 60,000 characters of tiny shakespeare.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHAKESPEARE_EXCERPTS = ("early.txt", "late.txt")
SEQ = 32


def fixture_file(name: str) -> Path:
    """A file of tests/fixtures; a missing one fails the test (the tests need nothing outside the repository)."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.fail(f"test fixture {path} is missing: tests/fixtures/README.md says what it holds and how to cut it",
                    pytrace=False)
    return path


def shakespeare_text() -> str:
    """Both Shakespeare excerpts, early then late, as one text."""
    return "\n".join(fixture_file(name).read_text() for name in SHAKESPEARE_EXCERPTS)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Token shards of real text, two domains (`early`, `late`): the Shakespeare excerpts of tests/fixtures."""
    return prepare_shards(tmp_path_factory.mktemp("text") / "shards")


def prepare_shards(out: Path | str) -> Path | str:
    """`ercstudy prepare-data` of the Shakespeare excerpts into `out`, a directory or a bucket URI (the `shards`
    fixture's, a scenario's own, the bucket tests')."""
    from ercstudy.platform.cli import main

    texts = [str(fixture_file(name)) for name in SHAKESPEARE_EXCERPTS]
    assert main(["prepare-data", *texts, "--out", str(out),
                 "--vocab-size", "300", "--seq-len", str(SEQ), "--rows-per-shard", "200", "--eval-fraction", "0.1",
                 "--workers", "2"]) == 0  # the default path: a Ray Data pipeline, on the session's Ray
    return out


def own_line(study: str) -> re.Pattern:
    """A line `ercstudy run` / `resume` of study `study` prints: the header, the trials' table, finished trials, the
    summary (anything else on the terminal came from Ray, DeepSpeed or a warning)."""
    name = re.escape(study)
    return re.compile(rf"^(|study {name}: .*|MLflow: .*|Ray's logs.*|\[{name}\] .*|  \S.*|leaderboard \(.*|results: .*)$")


def one_trial_study(name: str, steps: int, **train) -> dict:
    """The cluster tests' study: one tiny trial of 2 one-CPU workers on the synthetic corpus, a checkpoint
    every 10 steps, no evaluation, random search over alpha (one point), no early stopping."""
    return {
        "name": name,
        "base": {
            "model": {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32},
            "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
            "train": {"tokens": steps * 16 * 32, "global_batch_size": 16, "micro_batch_size": 4, "lr": 0.005,
                      "warmup_steps": 5, "report_every": 5, "checkpoint_every": 10, "seed": 3, **train},
            "data": {"num_domains": 4, "tokens_per_domain": 16, "shared_tokens": 16},
            "eval": {"sequences": 0, "mc_items": 0},
        },
        "search": {"sampler": "random", "num_trials": 1, "seed": 1,
                   "params": {"erc.alpha": {"type": "float", "low": 0.5, "high": 1.0}}},
        "objective": {"metric": "lm_loss", "mode": "min"},
        "scheduler": {"type": "none"},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
        "tracking": {"experiment": name},
    }


@functools.cache
def train_plain(erc_weight: float, steps: int = 200):
    """A few hundred plain-PyTorch steps on the synthetic corpus (shared by the tests that need a trained model).

    Returns (mean loss of the first 10 steps, of the last 10, final alpha*, the model).
    """
    import torch

    from ercstudy.trainables.config import DataConfig
    from ercstudy.trainables.data import SyntheticCorpus
    from ercstudy.trainables.erc import coupling_alpha, erc_loss
    from ercstudy.trainables.model import ModelConfig, MoELM
    from ercstudy.trainables.moe import MoEConfig

    torch.manual_seed(0)
    model = ModelConfig(vocab_size=80, d_model=32, n_layers=2, n_heads=2, seq_len=32)
    moe = MoEConfig(num_experts=4, top_k=1, expert_dim=32)
    corpus = SyntheticCorpus(DataConfig(num_domains=4, tokens_per_domain=16, shared_tokens=16), seq_len=32, seed=0)
    lm = MoELM(model, moe)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        tokens = corpus.batch("train", step, 16).tokens
        out = lm(tokens[:, :-1], tokens[:, 1:])
        loss = out.lm_loss + 0.01 * out.aux.lb_loss.mean()
        if erc_weight:
            loss = loss + erc_weight * erc_loss(lm.router_weights(), lm.gate_weights(), alpha=1.0, generator=gen).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    with torch.no_grad():
        m = erc_loss(lm.router_weights(), lm.gate_weights(), epsilon=0).activations
    lm.eval()
    return sum(losses[:10]) / 10, sum(losses[-10:]) / 10, coupling_alpha(m).mean().item(), lm


@contextlib.contextmanager
def single_process_group():
    """This process as a one-rank torch.distributed world (what a DeepSpeed engine needs), torn down after."""
    import torch.distributed as dist

    from ercstudy.netutil import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        if dist.is_initialized():
            ds_comm = sys.modules.get("deepspeed.comm")
            if ds_comm is not None and ds_comm.is_initialized():
                ds_comm.destroy_process_group()  # also drops DeepSpeed's cached groups, stale in the next world
            else:
                dist.destroy_process_group()
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def read_split(out: Path, split: str):
    """A split of prepared shards as arrays: (tokens [rows, seq_len + 1], domains [rows])."""
    import numpy as np
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted((out / split).glob("*.parquet"))]
    tokens = np.concatenate([np.stack(t.column("tokens").to_numpy(zero_copy_only=False)) for t in tables])
    domains = np.concatenate([t.column("domain").to_numpy() for t in tables])
    return tokens, domains
