"""Scenario of tests/integration/test_multinode.py, run in a process of its own (conftest's background scenarios).

A local multi-node Ray (ray.cluster_utils.Cluster: real GCS, real raylets, one machine): a head that holds no
CPU and two worker nodes of one CPU each. A study's one trial of two one-CPU workers can only run spread over
both worker nodes. Once its step-10 checkpoint is registered, one worker node is removed (its raylet and every
process on it killed); a fresh node joins 5 s later. Writes what the test checks to <out>/result.json.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import one_trial_study

STEPS = 40


def last_logged_step(uri: str) -> int:
    """The last step MLflow holds of the study's trial (reports arrive in order: once a report after a
    checkpoint's is in, that checkpoint is registered with Ray Train, not only being uploaded)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("multinode")
    children = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags] if exp else []
    return max((h[-1].step for r in children if (h := c.get_metric_history(r.info.run_id, "lm_loss"))), default=0)


def main(out: Path) -> None:
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    started = time.monotonic()
    # a cluster of its own, without a token (a plain `ray start` cluster, as cluster.yaml's nodes)
    from ercstudy.netutil import free_port

    # RAY_ADDRESS in every node's processes: with other Rays on this machine (the rest of the suite), Ray's processes
    # that look theirs up (Ray Train's placement-group cleaner) would find several (ray_runtime.start_local_ray)
    gcs_port = free_port()
    nodes = {"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "gcs_server_port": gcs_port, **nodes}, connect=False)
    try:
        workers = [cluster.add_node(num_cpus=1, **nodes) for _ in range(2)]
        cluster.wait_for_nodes()
        print(f"cluster up in {time.monotonic() - started:.0f} s", flush=True)
        spec, storage, uri = out / "multinode.yaml", out / "results", f"sqlite:///{out}/mlflow.db"
        spec.write_text(yaml.safe_dump(one_trial_study("multinode", STEPS), sort_keys=False))
        MlflowClient(uri).search_experiments()  # create the store's tables before the driver does
        # the driver's user has a ~/.ray/auth_token, as every plain ray.init() of Ray 2.60 leaves one: sent to this
        # cluster without tokens, every actor would die as it is created (ray_runtime.use_token_if_available)
        home = out / "home"
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text("0" * 64)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HOME": str(home)}
        log = (out / "run.log").open("w")
        driver = subprocess.Popen([sys.executable, "-m", "ercstudy", "run", str(spec), "--storage", str(storage),
                                   "--address", cluster.address], env=env, cwd=out, stdout=log, stderr=subprocess.STDOUT)
        submitted, lost_at = time.monotonic(), None
        while driver.poll() is None and time.monotonic() - submitted < 600:
            if last_logged_step(uri) >= 15:  # the step-10 checkpoint is registered: lose a worker node
                cluster.remove_node(workers[1], allow_graceful=False)
                lost_at = time.monotonic() - submitted
                break
            time.sleep(0.5)
        if lost_at is None:
            raise SystemExit("no checkpoint before the driver ended:\n" + (out / "run.log").read_text()[-3000:])
        print(f"worker node lost {lost_at:.0f} s after the study started", flush=True)
        time.sleep(5)  # the trial now waits: one CPU left, it needs two on two nodes
        cluster.add_node(num_cpus=1, **nodes)  # a node joins back
        driver.wait(timeout=900)
        log.close()
        ended = time.monotonic() - submitted
    finally:
        cluster.shutdown()

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("multinode")
    children = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    results = [json.loads(line) for f in (storage / "multinode").glob("*/result.json") for line in f.read_text().splitlines()]
    (out / "result.json").write_text(json.dumps({
        "driver_exit": driver.returncode, "driver_log": (out / "run.log").read_text()[-4000:], "steps_planned": STEPS,
        "lost_at_s": lost_at, "study_s": ended,
        "children": [{"status": r.data.tags.get("ercstudy.status"),
                      "steps": [m.step for m in c.get_metric_history(r.info.run_id, "lm_loss")]} for r in children],
        "resumed_from": [r["resumed_from_step"] for r in results if r.get("resumed_from_step")],
    }))
    print(f"study finished {ended:.0f} s after it started", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
