"""A study on a local multi-node Ray (ray.cluster_utils.Cluster: real GCS, real raylets, one machine).

The cluster: a head that holds no CPU (as a cloud head holds no trial resources) and two worker nodes of
one CPU each. The study's one trial has two workers of one CPU: it can only run spread over both worker
nodes. Once its first checkpoint is in storage, one worker node is removed (its raylet and every process
on it killed, as when a cloud node dies); a fresh node joins a few seconds later. Ray Train restarts the
worker group from the last checkpoint on the capacity that is back, the study finishes, and MLflow holds
each step once.

Storage is a directory every node sees (one machine: the same disk; on a cloud cluster, S3 or NFS).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import one_trial_study

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[1]
STEPS = 40

SPEC = one_trial_study("multinode", STEPS)


def last_logged_step(uri: str) -> int:
    """The last step MLflow holds of the study's trial (reports arrive in order: once a report after a
    checkpoint's is in, that checkpoint is registered with Ray Train, not only being uploaded)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("multinode")
    children = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags] if exp else []
    return max((h[-1].step for r in children if (h := c.get_metric_history(r.info.run_id, "lm_loss"))), default=0)


def test_a_trial_spread_over_two_nodes_survives_losing_one(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    # a cluster of its own, without the private Ray's token (a plain `ray start` cluster, as cluster.yaml's nodes)
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0}, connect=False)
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        spec, storage, uri = tmp_path / "multinode.yaml", tmp_path / "results", f"sqlite:///{tmp_path}/mlflow.db"
        spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
        MlflowClient(uri).search_experiments()  # create the store's tables before the driver does
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env.update(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(REPO))
        log = (tmp_path / "run.log").open("w")
        driver = subprocess.Popen([sys.executable, "-m", "ercstudy", "run", str(spec), "--storage", str(storage),
                                   "--address", cluster.address], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        # wait until the step-10 checkpoint is registered (the step-15 report is in), then lose a worker node
        started, lost_at = time.monotonic(), None
        while driver.poll() is None and time.monotonic() - started < 600:
            if last_logged_step(uri) >= 15:
                cluster.remove_node(workers[1], allow_graceful=False)
                lost_at = time.monotonic() - started
                break
            time.sleep(0.5)
        assert lost_at is not None, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(5)  # the trial now waits: one CPU left, it needs two on two nodes
        cluster.add_node(num_cpus=1)  # a node joins back
        driver.wait(timeout=900)
        log.close()
        out = (tmp_path / "run.log").read_text()
        assert driver.returncode == 0, out[-4000:]
    finally:
        cluster.shutdown()

    # the study finished, from a checkpoint after the loss: each step in MLflow once, the last one included
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("multinode")
    runs = c.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1 and children[0].data.tags["ercstudy.status"] == "completed", out[-3000:]
    steps = [m.step for m in c.get_metric_history(children[0].info.run_id, "lm_loss")]
    assert steps == list(range(5, STEPS + 1, 5)), steps
    # Tune saw the restored worker group's first report say where it resumed: a checkpoint, not step 0
    results = [json.loads(line) for f in (storage / "multinode").glob("*/result.json") for line in f.read_text().splitlines()]
    resumed = [r["resumed_from_step"] for r in results if r.get("resumed_from_step")]
    assert resumed and resumed[0] % 10 == 0, [r.get("step") for r in results]
    print(f"\nmulti-node: first checkpoint, node lost {lost_at:.0f} s after submit; resumed from step {resumed[0]}")
