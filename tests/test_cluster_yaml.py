"""cluster.yaml passes Ray's own cluster-launcher validation, offline, and keeps its promises."""

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def prepared(config):
    from ercstudy.platform.compat import validate_cluster_config

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
    assert any("mlflow server" in c for c in config["head_start_ray_commands"])
    assert any("pip install" in c and "/home/ray/ercstudy" in c for c in config["setup_commands"])


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
