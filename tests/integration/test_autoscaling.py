"""`ercstudy submit` to a local autoscaling cluster that starts from zero worker nodes.

Ray's fake multi-node provider (the one ray.cluster_utils.AutoscalingCluster uses) runs the real
autoscaler on a real head: when the study's trial asks for CPUs the head does not have, the
autoscaler starts a worker node (a real raylet on this machine), the trial trains there, and once the
node has been idle for `idle_timeout_minutes` the autoscaler removes it (timed: from the study's end to the
last node gone). The cluster runs with token authentication, as cluster.yaml's, and the study is submitted
through the Jobs API with the token. The run itself is tests/integration/scenarios/autoscaling.py, in a process of its own
from the session's start (conftest).

AutoscalingCluster itself is not used: its start() runs `ray stop --force` (every Ray on the machine,
the tests' shared one included) and reads an example config that the ray 2.60 wheel does not ship.
The head here is started as ercstudy's private Ray is, and stopped alone.

The node type has cluster.yaml's shape for a CPU machine: min 0, max 2 workers of one type, a head
that holds no trial resources. (A GPU-shaped type would make Ray Train pick NCCL for a fake GPU.)
"""

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.background("autoscaling"), pytest.mark.timeout(1200)]


def test_submit_scales_from_zero_and_back(scenario):
    assert scenario["worker_nodes_before"] == 0  # from zero
    assert scenario["submit"]["exit"] == 0, scenario["submit"]["out"]
    logs = scenario["logs"]
    # On one machine the fake worker nodes share the head's temp directory: when the worker node unpacks the
    # job's working_dir for the trial's workers, it replaces the head's copy, the job driver's working
    # directory, and the driver's last step (Tune's final analysis, os.getcwd) can then fail after the study
    # has finished. Real nodes have disks of their own. Either way the trial must have completed.
    cwd_lost = "FileNotFoundError" in logs and "in abspath" in logs and "completed     step 20/20" in logs
    assert scenario["succeeded"] or (scenario["status"] == "FAILED" and cwd_lost), f"{scenario['status']}\n{logs[-4000:]}"
    assert scenario["peak"] >= 1 and scenario["submit_to_first_step_s"] is not None, logs[-3000:]
    assert scenario["steps"] == [list(range(5, scenario["steps_planned"] + 1, 5))]  # each step once, in MLflow
    # and back to zero: the node goes once idle (Ray Train's resource request is cancelled when its controller ends)
    removed = scenario["study_end_to_last_node_removed_s"]
    assert removed is not None, "a worker node was still up 7 minutes after the study ended"
    timings = {k: round(scenario[k], 1) for k in ("submit_to_first_step_s", "submit_to_study_end_s", "study_end_to_last_node_removed_s")}
    print("\nautoscaling:", json.dumps({**timings, "idle_timeout_s": scenario["idle_timeout_s"], "worker_nodes_at_peak": scenario["peak"],
                                         "job": scenario["status"]}))  # README: "Autoscaling from zero, tested"
