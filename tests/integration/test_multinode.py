"""A study on a local multi-node Ray (ray.cluster_utils.Cluster: real GCS, real raylets, one machine).

The cluster: a head that holds no CPU (as a cloud head holds no trial resources) and two worker nodes of
one CPU each. The study's one trial has two workers of one CPU: it can only run spread over both worker
nodes. Once its first checkpoint is in storage, one worker node is removed (its raylet and every process
on it killed, as when a cloud node dies); a fresh node joins a few seconds later. Ray Train restarts the
worker group from the last checkpoint on the capacity that is back, the study finishes, and MLflow holds
each step once.

Storage is a directory every node sees (one machine: the same disk; on a cloud cluster, S3 or NFS). The run
itself is tests/integration/scenarios/multinode.py, in a process of its own from the session's start (conftest).
"""

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.background("multinode"), pytest.mark.timeout(1200)]


def test_a_trial_spread_over_two_nodes_survives_losing_one(scenario):
    assert scenario["driver_exit"] == 0, scenario["driver_log"]
    # the study finished, from a checkpoint after the loss: each step in MLflow once, the last one included
    (child,) = scenario["children"]
    assert child["status"] == "completed", scenario["driver_log"]
    assert child["steps"] == list(range(5, scenario["steps_planned"] + 1, 5)), child["steps"]
    # Tune saw the restored worker group's first report say where it resumed: a checkpoint, not step 0
    assert scenario["resumed_from"] and scenario["resumed_from"][0] % 10 == 0, scenario["resumed_from"]
