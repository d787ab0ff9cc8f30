"""Scenario of tests/integration/test_study_run.py, run in a process of its own (conftest's background scenarios), on a local
Ray of its own (ercstudy's private one: loopback, token) and the session's S3 server (moto, conftest).

The quickstart study's search (search_spaces/quickstart.yaml: TPE over alpha, experts, top-k and the learning
rate, ASHA) on Parquet shards of real text, with its storage in a bucket (the study's own `storage:` key) and a
real MLflow SQLite store beside it: the driver is killed (SIGKILL, its process group) once a trial has finished
and Tune's state is in the bucket; `ercstudy resume` from a fresh working directory finishes it; then, with every
earlier working directory deleted, `ercstudy report` and `ercstudy eval` work from the bucket alone. Writes what
the test checks to <out>/result.json.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import yaml
from conftest import SEQ, prepare_shards, shakespeare_text

REPO = Path(__file__).resolve().parents[3]


def ercstudy(*args, cwd, env, timeout=900):
    r = subprocess.run([sys.executable, "-m", "ercstudy", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return {"exit": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def mc_task(root: Path) -> Path:
    """One lm-eval multiple-choice task from a local JSONL file (next line of the Shakespeare text)."""
    lines = [ln for ln in shakespeare_text().splitlines() if len(ln) > 20][:40]
    items = [{"context": lines[i], "choices": [lines[i + 1], lines[i + 7], lines[i + 13]], "gold": 0} for i in range(0, 24, 3)]
    (root / "mc.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "next_line.yaml").write_text(
        f"task: next_line\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    return tasks


def main(out: Path) -> None:
    from mlflow.tracking import MlflowClient

    from ercstudy.platform.cluster import storage as locations
    from ercstudy.platform.cluster.ray_runtime import enable_token_auth, new_token_file, start_local_ray

    started = time.monotonic()
    outside = out / "outside"  # what a cluster keeps elsewhere: the MLflow store, the shards, the lm-eval task files
    outside.mkdir()
    shards = prepare_shards(outside / "shards")
    bucket = f"quickstart-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    storage = f"s3://{bucket}/studies"
    uri = f"sqlite:///{outside}/mlflow.db"
    # the experiment with its artifacts beside the store (MLflow's default would be ./mlruns of the driver's directory)
    MlflowClient(uri).create_experiment("quickstart", artifact_location=str(outside / "artifacts"))
    spec = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    spec["storage"] = storage  # the study's own storage: key (no --storage on `run`)
    spec["base"]["model"].update(vocab_size=320, seq_len=SEQ)
    spec["base"]["train"]["tokens"] //= 64 // SEQ  # the quickstart's 60 steps at the shards' shorter sequences
    spec["base"]["data"] = {"kind": "parquet", "path": str(shards)}
    spec["base"]["eval"]["mc_items"] = 0  # the synthetic corpus's task
    spec["tracking"] = {"uri": uri, "experiment": "quickstart"}
    (outside / "quickstart.yaml").write_text(yaml.safe_dump(spec))

    token = new_token_file()
    enable_token_auth(token)  # this process's env: the drivers below inherit the token's path
    ray = start_local_ray(2)
    env = {**os.environ, "RAY_ADDRESS": ray.address, "PYTHONPATH": str(REPO)}
    result: dict = {"uri": uri, "storage": storage, "trials": spec["search"]["num_trials"]}
    study = locations.resolve(storage) / "quickstart"

    def listing() -> list[str]:
        sel = pafs.FileSelector(study.path, recursive=True, allow_not_found=True)
        return [i.path for i in study.fs.get_file_info(sel)]

    def read(path: str) -> bytes:
        with study.fs.open_input_stream(path) as f:
            return f.read()

    def finished_trials() -> int:
        c = MlflowClient(uri)
        runs = c.search_runs([c.get_experiment_by_name("quickstart").experiment_id])
        return sum(r.data.tags.get("ercstudy.status") not in (None, "running") for r in runs if "mlflow.parentRunId" in r.data.tags)

    work = [out / f"work{i}" for i in range(3)]  # a fresh working directory for each command
    for w in work:
        w.mkdir()
    try:
        # 1. the study, its driver killed (all of its process group) once a trial has finished and Tune's state in the
        # bucket says so (Tune uploads it every SYNC_PERIOD_S: a trial that ended since is run again by the resumed
        # study, as Tune resumes what its state holds unfinished, and one that ASHA stopped may then complete)
        log = (out / "run.log").open("w")
        driver = subprocess.Popen([sys.executable, "-m", "ercstudy", "run", str(outside / "quickstart.yaml")], cwd=work[0],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killed = None
        while driver.poll() is None and time.monotonic() - started < 1200:
            if finished_trials() and any(Path(f).name.startswith("experiment_state") and b"TERMINATED" in read(f) for f in listing()):
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
                killed = time.monotonic() - started
                break
            time.sleep(1)
        log.close()
        result["first_log"] = (out / "run.log").read_text()
        result["killed_at_s"] = killed
        if killed is None:
            raise SystemExit(f"no trial finished before the driver ended ({driver.returncode}):\n" + result["first_log"][-3000:])
        c = MlflowClient(uri)
        exp = c.get_experiment_by_name("quickstart").experiment_id
        result["runs_before_kill"] = [r.info.run_id for r in c.search_runs([exp]) if "mlflow.parentRunId" in r.data.tags]
        result["study_files_after_kill"] = study.children()
        result["work0_after_kill"] = [p.name for p in work[0].iterdir()]
        time.sleep(5)  # Ray frees the killed driver's actors and placement groups

        # 2. resumed from another working directory: from the bucket (Tune's state, the trials' checkpoints)
        result["resumed"] = ercstudy("resume", "quickstart", "--storage", storage, cwd=work[1], env=env)
        result["work1_after_resume"] = [p.name for p in work[1].iterdir()]
        result["resumed_at_s"] = time.monotonic() - started
        logs = next((ln for ln in result["resumed"]["stdout"].splitlines() if ln.startswith("Ray's logs (workers, DeepSpeed): ")), None)
        if logs:
            logs = Path(logs.split(": ", 1)[1].split(" on this node")[0])
            result["ray_logs_hold_driver_and_workers"] = (logs / "ercstudy-driver.log").is_file() and any(logs.glob("worker-*.out"))
        for w in work[:2]:
            shutil.rmtree(w)

        # 3. report and eval from the bucket alone
        result["report"] = ercstudy("report", "quickstart", "--storage", storage, cwd=work[2], env=env)
        result["report_files"] = (study / "report").children() if (study / "report").exists() else []
        result["leaderboard"] = (study / "leaderboard.csv").read_text() if (study / "leaderboard.csv").exists() else ""
        result["fits"] = json.loads((study / "report" / "fits.json").read_text()) if (study / "report" / "fits.json").exists() else None
        board = result["leaderboard"].splitlines()
        completed = next((row.split(",")[0] for row in board[1:] if ",completed," in row), None)
        if completed:
            tasks = mc_task(outside)
            result["eval"] = ercstudy("eval", f"quickstart/{completed}", "--storage", storage, "--tasks", "next_line",
                                      "--include-path", str(tasks), "--batch-size", "8", cwd=work[2], env=env)
        result["work2_after"] = [p.name for p in work[2].iterdir()]
        result["elapsed_s"] = time.monotonic() - started
    finally:
        ray.stop()
        shutil.rmtree(os.path.dirname(token), ignore_errors=True)
        (out / "result.json").write_text(json.dumps(result))
    print(f"quickstart in a bucket: killed at {killed:.0f} s, resumed and finished at {result['resumed_at_s']:.0f} s, "
          f"report + eval done at {result['elapsed_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
