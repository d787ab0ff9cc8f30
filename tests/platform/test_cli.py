"""`ercstudy train` refuses bad input with one line and exit status 2, before starting Ray; the terminal
shows ercstudy's lines (a line per report, the summary last), Ray's only with --verbose; --storage
defaults to $ERCSTUDY_STORAGE."""

import pytest
import yaml
from conftest import SEQ

from ercstudy.platform.cli import describe, main
from ercstudy.trainables.config import load_trial_config


@pytest.mark.parametrize(
    "text,expected",
    [
        ("base:\n  moe: {num_experts: 4, top_k: 8}\n", "base.moe.top_k: must be <= num_experts (4), got 8"),
        ("model:\n  d_model: 64\n   n_layers: 2\n", "YAML syntax error at line 3"),
        ("erc: {alpha: -0.5}\n", "erc.alpha: must be >= 0"),
    ],
)
def test_config_errors_are_one_line_with_exit_status_2(tmp_path, capsys, text, expected):
    path = tmp_path / "trial.yaml"
    path.write_text(text)
    assert main(["train", str(path), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ercstudy: error: ") and expected in err and "\n" not in err


def test_missing_file_and_existing_run(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "runs" / "quick").mkdir(parents=True)
    path = tmp_path / "quick.yaml"
    path.write_text("model: {d_model: 64}\n")
    assert main(["train", str(path), "--storage", str(tmp_path / "runs")]) == 2
    assert "already exists" in capsys.readouterr().err and "--resume" not in str(path)


def test_quickstart_config_is_valid_and_tiny():
    cfg = load_trial_config("search_spaces/quickstart.yaml")
    assert cfg.erc.enabled and cfg.num_params() < 1_000_000 and cfg.steps == 60
    assert "MoE: 8 experts, top-2" in describe(cfg)


# ---------------------------------------------------------------------------------------------
# What the terminal shows


def test_storage_defaults_to_ERCSTUDY_STORAGE(tmp_path, monkeypatch, capsys):
    from ercstudy.platform.cli import build_parser

    monkeypatch.delenv("ERCSTUDY_STORAGE", raising=False)
    assert build_parser().parse_args(["run", "s.yaml"]).storage == "ercstudy_results"
    monkeypatch.setenv("ERCSTUDY_STORAGE", str(tmp_path / "store"))
    for argv in (["run", "s.yaml"], ["resume", "s"], ["train", "t.yaml"], ["report", "s"], ["submit", "s.yaml", "--address", "x"]):
        assert build_parser().parse_args(argv).storage == str(tmp_path / "store"), argv
    assert build_parser().parse_args(["run", "s.yaml", "--storage", "elsewhere"]).storage == "elsewhere"
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "$ERCSTUDY_STORAGE, else ./ercstudy_results" in " ".join(capsys.readouterr().out.split())
    # and the commands use it: an existing run is found there
    (tmp_path / "store" / "quick").mkdir(parents=True)
    path = tmp_path / "quick.yaml"
    path.write_text("model: {d_model: 64}\n")
    assert main(["train", str(path)]) == 2
    assert f"already exists in {tmp_path / 'store'}" in capsys.readouterr().err


def test_verbose_is_a_flag_of_the_commands_that_run_ray():
    from ercstudy.platform.cli import build_parser

    parser = build_parser()
    for argv in (["run", "s.yaml"], ["resume", "s"], ["train", "t.yaml"]):
        assert parser.parse_args(argv).verbose is False and parser.parse_args([*argv, "--verbose"]).verbose is True
    with pytest.raises(SystemExit):
        parser.parse_args(["validate", "s.yaml", "--verbose"])


QUICK_STEPS = 60


def report(step, **extra):
    return {"step": step, "total_steps": QUICK_STEPS, "lm_loss": 4.0 - step / 100, "lb_loss": 1.0, "erc_loss": 1e-3,
            "alpha_star": 0.9, "eps_mean": 0.6, "router_cos": 0.1, "domain_nmi": 0.2, "lr": 1e-3, "tokens_per_s": 1234.0,
            "coupling_matrix": [[[1.0]]], **extra}


@pytest.fixture()
def fake_ray(monkeypatch):
    """`ercstudy train` without Ray: a trial whose Train controller calls the callbacks with these reports."""
    import contextlib
    import queue
    import sys
    import types

    from ercstudy.platform.cluster import ray_runtime
    from ercstudy.platform.study import progress
    from ercstudy.platform.tracking import client as tracking

    events = []

    @contextlib.contextmanager
    def ray_session(address=None, *, verbose=False):
        events.append(("connect", verbose))
        yield ray_runtime.RayLogs("/tmp/ercstudy-ray-x/session_1/logs", local=True)
        events.append(("disconnect", None))

    def run_trial(cfg, *, name, storage_path, callbacks=None):
        events.append(("trial", (name, cfg)))
        # reports at 10 .. 40; the workers die and resume from the checkpoint at 30 (the restored worker's
        # first report says so); then 40 .. 60
        history = ([report(s) for s in (10, 20, 30, 40)] + [report(40, resumed_from_step=30), report(50)]
                   + [report(60, **{"eval/loss": 3.5})])
        for m in history:
            for cb in callbacks:
                cb.after_report(None, [m], None)
        events.append(("fit returned", None))
        return types.SimpleNamespace(history=history, final=history[-1], path=f"{storage_path}/{name}",
                                     checkpoint_path=f"{storage_path}/{name}/checkpoint_000005", error=None, stop_reason=None)

    monkeypatch.setattr(ray_runtime, "ray_session", ray_session)
    monkeypatch.setattr(tracking, "log_trial_artifacts", lambda *a: None)  # plots: tests/platform/tracking/test_callbacks.py
    monkeypatch.setattr(progress, "report_queue", queue.Queue)
    from ercstudy.platform.study.trial import ReportQueueCallback

    monkeypatch.setitem(sys.modules, "ercstudy.platform.study.trial",
                        types.SimpleNamespace(run_trial=run_trial, ReportQueueCallback=ReportQueueCallback))
    return events


@pytest.mark.parametrize("verbose", [False, True])
def test_train_prints_a_line_per_report_then_the_summary_last(tmp_path, monkeypatch, capsys, fake_ray, verbose):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    path = tmp_path / "quick.yaml"
    path.write_text(open("search_spaces/quickstart.yaml").read())
    assert main(["train", str(path), "--storage", str(tmp_path / "runs"), *(["--verbose"] if verbose else [])]) == 0
    trial = [e for e in fake_ray if e[0] == "trial"]
    assert [e for e in fake_ray if e[0] != "trial"] == [("connect", verbose), ("fit returned", None), ("disconnect", None)]
    assert trial[0][1][0] == "quick-train"  # never the study's own STORAGE/quick
    out = capsys.readouterr().out.splitlines()
    steps = [line.split("|")[0].split()[1] for line in out if line.startswith("step ")]
    assert steps == ["10/60", "20/60", "30/60", "40/60", "40/60", "50/60", "60/60"]
    assert out[out.index("step 40/60 | lm 3.6000 | lb 1.0000 | erc 1.00e-03 | alpha* 0.90 | eps 0.600 | cos 0.100 | nmi 0.200 | "
                         "lr 1.00e-03 | 1,234 tok/s") + 1] == "resumed from checkpoint at step 30"
    assert "eval 3.5000" in [line for line in out if line.startswith("step 60/60")][0]
    logs = [line for line in out if line.startswith("Ray's logs (workers, DeepSpeed): /tmp/ercstudy-ray-x/session_1/logs")]
    assert len(logs) == 1 and logs[0].endswith("--verbose shows them here too") != verbose
    # the summary comes last, after every progress line
    summary = out.index("finished quick-train: step 60 | lm_loss 3.4000 | alpha* 0.90 | eps 0.600")  # a study file: its own name
    assert all(not line.startswith(("step ", "resumed")) for line in out[summary:])
    assert out[-1].startswith("MLflow UI: mlflow ui --backend-store-uri sqlite:///")
    assert out[-2] == "Ray's logs: /tmp/ercstudy-ray-x/session_1/logs"


def test_driver_logs_of_ray_and_deepspeed_go_to_the_file_not_the_terminal(tmp_path):
    """In a fresh process (the routing changes its logging for good): Ray's loggers, DeepSpeed's (whose
    console handler comes with its import, after the routing) and Python warnings."""
    import subprocess
    import sys

    code = f"""
import logging, sys, warnings
from ercstudy.platform.cluster.ray_runtime import quiet_driver_logs
pending = quiet_driver_logs()
logging.getLogger("ray.tune.tune").warning("tune warns")
ds = logging.getLogger("DeepSpeed"); ds.addHandler(logging.StreamHandler(sys.stdout)); ds.setLevel(logging.INFO)
ds.info("Setting ds_accelerator to cpu")
warnings.warn("a library warns")
logging.getLogger("urllib3.connectionpool").warning("no handler of its own")
print("ercstudy's own line")
pending.write_to({str(tmp_path / "driver.log")!r})
logging.getLogger("ray.data").warning("after the file is known")
again = quiet_driver_logs()  # a second session in the same process: the new file only
again.write_to({str(tmp_path / "second.log")!r})
logging.getLogger("ray.tune").warning("in the second session")
ds.warning("DeepSpeed in the second session")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ercstudy's own line\n" and r.stderr == "", (r.stdout, r.stderr)
    log = (tmp_path / "driver.log").read_text()
    for text in ("tune warns", "Setting ds_accelerator to cpu", "a library warns", "no handler of its own", "after the file is known"):
        assert text in log, text
    second = (tmp_path / "second.log").read_text()
    assert "in the second session" in second and "DeepSpeed in the second session" in second and "second session" not in log


@pytest.mark.ray
@pytest.mark.slow  # starts the shared Ray (half a minute on 2 cores), then two drivers
def test_verbose_streams_the_output_of_rays_processes_and_quiet_keeps_it_in_the_logs(ray_session):
    """Two drivers on the shared Ray, as `ercstudy run/train` connect: the quiet one prints only its own
    lines and names the log directory, where the worker's line is; the verbose one shows that line."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    code = """
import sys, time
import ray
from ercstudy.platform.cluster.ray_runtime import ray_session

verbose = sys.argv[1] == "verbose"
with ray_session(verbose=verbose) as logs:
    @ray.remote(num_cpus=0)
    def work(tag):
        print("a line from a Ray worker", tag, flush=True)
        return 1

    assert ray.get(work.remote(sys.argv[2])) == 1
    time.sleep(10 if verbose else 0)  # Ray's log monitor forwards the line within seconds
print("logs:", logs.directory)
print("the summary")
"""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    tag = f"t{os.getpid()}-{time.time_ns()}"
    quiet = subprocess.run([sys.executable, "-c", code, "quiet", tag + "q"], env=env, capture_output=True, text=True, timeout=600)
    verbose = subprocess.run([sys.executable, "-c", code, "verbose", tag + "v"], env=env, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr[-3000:] + verbose.stderr[-3000:]
    out = quiet.stdout.splitlines()
    assert quiet.stderr == "" and out[-1] == "the summary" and len(out) == 2, (quiet.stdout, quiet.stderr)
    logs = Path(out[0].split(": ", 1)[1])
    assert (logs / "ercstudy-driver.log").is_file()
    deadline = time.monotonic() + 60
    while not any(f"a line from a Ray worker {tag}q" in p.read_text(errors="replace") for p in logs.glob("worker-*.out")):
        assert time.monotonic() < deadline, f"the worker's line is in no worker-*.out under {logs}"
        time.sleep(1)
    assert f"a line from a Ray worker {tag}v" in verbose.stdout + verbose.stderr, verbose.stdout + verbose.stderr
    assert verbose.stdout.splitlines()[-1] == "the summary"  # left Ray before it: nothing streamed follows


@pytest.mark.ray
def test_train_refuses_a_ray_data_trial_that_leaves_no_cpu_for_its_reads(ray_session, shards, tmp_path, monkeypatch, capsys):
    """The tests' Ray has 2 CPUs: a 2-CPU trial whose shards Ray Data reads would wait for good (its reads need a
    free CPU), so `ercstudy train` says so and ends the trial's MLflow run, before any worker starts."""
    import yaml
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec = yaml.safe_load(open("search_spaces/quickstart.yaml"))
    spec["base"]["model"].update(vocab_size=320, seq_len=SEQ)
    spec["base"]["data"] = {"kind": "parquet", "path": str(shards), "reader": "ray_data"}
    spec["base"]["resources"] = {"num_workers": 2, "cpus_per_worker": 1}
    path = tmp_path / "ray_data.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["train", str(path), "--storage", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "trial failed: resources: the trial needs 2 CPU(s) and 1 left free for Ray Data's reads" in err, err
    c = MlflowClient(uri)
    (run,) = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert run.info.status == "FAILED", run.info.status


def test_train_takes_overrides_and_floats_as_researchers_write_them(tmp_path, monkeypatch, capsys, fake_ray):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    path = tmp_path / "trial.yaml"
    path.write_text(open("search_spaces/quickstart.yaml").read())  # a study file: its base trains
    assert main(["train", str(path), "base.train.lr=3e-4", "base.train.warmup_steps=1e1", "--storage", str(tmp_path / "runs")]) == 0
    (name, cfg), = [e[1] for e in fake_ray if e[0] == "trial"]
    assert cfg.train.lr == 3e-4 and cfg.train.warmup_steps == 10
    assert main(["train", str(path), "base.train.lrr=3e-4", "--name", "x", "--storage", str(tmp_path / "runs")]) == 2
    assert "base.train.lrr" in capsys.readouterr().err


def test_version_and_config_of_a_trial_file(tmp_path, capsys):
    import ercstudy

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"ercstudy {ercstudy.__version__}"
    path = tmp_path / "t.yaml"
    path.write_text("train: {lr: 3e-4}\n")
    assert main(["config", str(path), "erc.alpha=0.25"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["lr"] == 3e-4 and resolved["erc"]["alpha"] == 0.25 and "moe" in resolved


@pytest.mark.parametrize("data,expected", [
    ({"kind": "parquet", "path": "no/such/shards"}, "no/such/shards"),
])
def test_a_study_whose_data_is_missing_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys, data, expected):
    spec = yaml.safe_load(open("search_spaces/quickstart.yaml"))
    spec["base"]["data"] = data
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    for command in ("validate", "run"):  # dry-run plans a study whose shards are not made yet
        assert main([command, str(path)]) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith("ercstudy: error: data.path") and expected in err and "\n" not in err, (command, err)
    assert not (tmp_path / "ercstudy_results").exists()  # refused before the study's directory, tracking or Ray


def test_report_against_a_server_that_does_not_answer_is_one_line_in_seconds(tmp_path, capsys):
    """A laptop's report of a cluster study: its recorded server (or --tracking-uri) does not answer."""
    import json
    import time

    from ercstudy.netutil import free_port

    study = tmp_path / "results" / "quickstart"
    study.mkdir(parents=True)
    (study / "study.yaml").write_text(open("search_spaces/quickstart.yaml").read())
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    (study / "study.json").write_text(json.dumps({"name": "quickstart", "tracking_uri": dead, "experiment_id": "1",
                                                  "parent_run_id": "abc"}))
    for extra in ([], ["--tracking-uri", f"http://127.0.0.1:{free_port()}"]):
        started = time.monotonic()
        assert main(["report", "quickstart", "--storage", str(tmp_path / "results"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert time.monotonic() - started < 15
        uri = extra[1] if extra else dead
        assert err.startswith(f"ercstudy: error: MLflow tracking server {uri} cannot be reached") and "\n" not in err, err
