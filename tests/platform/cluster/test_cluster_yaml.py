"""cluster.yaml passes Ray's own cluster-launcher validation, offline, and keeps its promises."""

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[3] / "cluster.yaml"


def prepared(config):
    from ercstudy.platform.cluster.private_apis import validate_cluster_config

    return validate_cluster_config(config)  # Ray's defaults for the provider, then `ray up`'s checks (no cloud call)


def test_cluster_yaml_passes_ray_validation():
    config = prepared(yaml.safe_load(CLUSTER.read_text()))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert {n: t["resources"]["GPU"] for n, t in types.items() if "GPU" in t["resources"]} == {"gpu_1x": 1, "gpu_8x": 8}
    assert all(t.get("min_workers", 0) == 0 for n, t in types.items() if n != config["head_node_type"])  # from zero
    assert config["idle_timeout_minutes"] > 0 and config["docker"]["image"].startswith("rayproject/ray:2.60")
    ports = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in ports] == [(22, 22)]  # nothing but SSH from outside
    assert any("pip install" in c and "/home/ray/ercstudy" in c for c in config["setup_commands"])


def test_cluster_yaml_exposes_nothing_and_authenticates_every_node():
    import ipaddress

    text = CLUSTER.read_text()
    config = prepared(yaml.safe_load(text))
    # SSH from the range the user sets, never the whole internet
    cidrs = [r["CidrIp"] for p in config["provider"]["security_group"]["IpPermissions"] for r in p["IpRanges"]]
    assert cidrs and all(ipaddress.ip_network(c).num_addresses < 2**16 for c in cidrs), cidrs
    assert "0.0.0.0" not in text.replace("0.0.0.0/0", "")  # nothing binds every interface
    assert "0.0.0.0/0" not in text
    # token authentication on every node, the token from the user's home (never a file of this repository)
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    token_mounts = {remote: local for remote, local in config["file_mounts"].items() if remote.endswith("auth_token")}
    assert token_mounts == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    assert not list(CLUSTER.parent.glob("**/auth_token"))
    # the dashboard (and its Jobs API) and MLflow on the head's loopback only, reached through SSH tunnels
    head = next(c for c in ray_starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head
    mlflow = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(mlflow) == 1 and "--host 127.0.0.1" in mlflow[0]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(unknown_key=1),
        lambda c: c["available_node_types"]["gpu_1x"].update(resources={"CPU": 16, "GPU": 0.5}),
        lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=7, max_workers=8),  # over the global max_workers
        lambda c: c.update(head_node_type="nope"),
    ],
)
def test_ray_validation_catches_mistakes(mutate):
    config = yaml.safe_load(CLUSTER.read_text())
    mutate(config)
    with pytest.raises(Exception):  # noqa: B017 (jsonschema ValidationError or Ray's ValueError)
        prepared(config)
