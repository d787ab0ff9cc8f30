"""Scenario of tests/integration/test_autoscaling.py, run in a process of its own (conftest's background scenarios): a local
autoscaling cluster from zero worker nodes (Ray's fake multi-node provider, a real autoscaler and raylets), a study
submitted to it with `ercstudy submit`, and the wait until the autoscaler has removed its nodes again.
Writes what the test checks to <out>/result.json.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml
from conftest import one_trial_study

STEPS = 20
SPEC = one_trial_study("autoscaled", STEPS)
IDLE_TIMEOUT_MINUTES = 0.5  # 30 s (cluster.yaml: 10 minutes): longer than the driver takes to end after its trial


def autoscaling_config(gcs_address: str) -> dict:
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE  # the head type it tags

    return {
        "cluster_name": "ercstudy-local",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        # the fake provider starts each node itself: no updater (it would SSH into the node to run `ray start`)
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "disable_node_updaters": True,
                     "disable_launch_config_check": True,
                     # every fake node has this machine's address: the autoscaler must tell them apart by node id, or it
                     # never matches a node's load to the node it launched, never sees it idle and never removes it
                     "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_2x": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def worker_raylets(gcs_port: int) -> list[psutil.Process]:
    """The raylets of this cluster's worker nodes (the head's is started with --head)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "raylet" in (proc.info["name"] or "") and f":{gcs_port}" in cmd and "--head" not in cmd:
            found.append(proc)
    return found


def first_step_logged(uri: str) -> bool:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("autoscaled")
    runs = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags] if exp else []
    return any(c.get_metric_history(r.info.run_id, "lm_loss") for r in runs)


def main(out: Path) -> None:
    from mlflow.tracking import MlflowClient
    from ray.autoscaler._private.util import validate_config
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ercstudy.netutil import free_ports
    from ercstudy.platform.cluster.ray_runtime import new_token_file

    gcs_port, dashboard_port = free_ports(2)
    config = autoscaling_config(f"127.0.0.1:{gcs_port}")
    validate_config(config)
    (out / "autoscaling.yaml").write_text(yaml.safe_dump(config))
    token = new_token_file()
    uri = f"sqlite:///{out}/mlflow.db"
    MlflowClient(uri).search_experiments()  # the store's tables, before the driver opens it
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": token, "MLFLOW_TRACKING_URI": uri, "RAY_enable_metrics_collection": "0",
           # for every process of the head and of the nodes its autoscaler starts (ray_runtime.start_local_ray says why)
           "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
    ray_dir = tempfile.mkdtemp(prefix="ercstudy-as-")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
         "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=0", f"--temp-dir={ray_dir}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--autoscaling-config={out / 'autoscaling.yaml'}"],
        env=env, stdout=(out / "head.log").open("w"), stderr=subprocess.STDOUT, cwd=out)
    result: dict = {}
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in (out / "head.log").read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the head did not start:\n" + (out / "head.log").read_text()[-3000:])
            time.sleep(0.5)
        result["worker_nodes_before"] = len(worker_raylets(gcs_port))
        workdir = out / "project"
        workdir.mkdir()
        (workdir / "study.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
        client_env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_FAKE_CLUSTER", "RAY_ADDRESS")}  # the token file only
        submitted = time.monotonic()
        sub = subprocess.run([sys.executable, "-m", "ercstudy", "submit", "study.yaml", "--address", address, "--job-id",
                              "autoscaled-1", "--storage", str(out / "results")], env=client_env, cwd=workdir,
                             capture_output=True, text=True, timeout=120)
        result["submit"] = {"exit": sub.returncode, "out": sub.stdout + sub.stderr}
        if sub.returncode != 0:
            return
        jobs = JobSubmissionClient(address, headers={"Authorization": f"Bearer {open(token).read().strip()}"})
        first_step, peak = None, 0
        while time.monotonic() - submitted < 400:
            peak = max(peak, len(worker_raylets(gcs_port)))
            if first_step is None and first_step_logged(uri):
                first_step = time.monotonic() - submitted
                print(f"first step logged {first_step:.0f} s after submit", flush=True)
            status = jobs.get_job_status("autoscaled-1")
            if status.is_terminal():
                break
            time.sleep(1)
        ended = time.monotonic()
        print(f"job {status} {ended - submitted:.0f} s after submit; waiting for the nodes to go", flush=True)
        # scale-down: the autoscaler removes the nodes once idle (idle_timeout_minutes) and no resource request holds them
        removed = None
        while time.monotonic() - ended < 420:
            if not worker_raylets(gcs_port):
                removed = time.monotonic() - ended
                break
            time.sleep(1)
        print(f"last worker node removed {removed} s after the study ended", flush=True)
        result.update(status=str(status), succeeded=status == JobStatus.SUCCEEDED, logs=jobs.get_job_logs("autoscaled-1"),
                      peak=peak, submit_to_first_step_s=first_step, submit_to_study_end_s=ended - submitted,
                      study_end_to_last_node_removed_s=removed, idle_timeout_s=IDLE_TIMEOUT_MINUTES * 60)
    finally:
        head.terminate()
        head.wait(timeout=60)
        for proc in worker_raylets(gcs_port):
            proc.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)
        c = MlflowClient(uri)
        exp = c.get_experiment_by_name("autoscaled")
        children = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags] if exp else []
        result["steps"] = [[m.step for m in c.get_metric_history(r.info.run_id, "lm_loss")] for r in children]
        result["steps_planned"] = STEPS
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
