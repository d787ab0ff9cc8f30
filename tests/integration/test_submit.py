"""`ercstudy submit` to the Jobs API of the shared local Ray (a cluster's head serves the same API), of a study
whose data is in a bucket: the job ships code, never data, and the trial's worker streams its batches and its
held-out set from S3 (conftest's moto server; the worker inherits the AWS_* environment, as a cluster node's
processes do), its batches read by Ray Data (data.reader: ray_data). A cluster that autoscales from zero for the submitted study: tests/integration/test_autoscaling.py."""

import json
import math
import os
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from conftest import SEQ, own_line, prepare_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]
REPO = Path(__file__).resolve().parents[2]
OWN_LINE = own_line("submitted")
STEPS = 20


def test_submit_runs_a_study_on_data_in_a_bucket_as_a_ray_job(ray_session, bucket, tmp_path, monkeypatch, capsys):
    """`ercstudy submit` to the Jobs API of the shared local Ray: the job's log holds ercstudy's lines only, the
    summary last; its trial learns from shards that `ercstudy prepare-data` wrote into the bucket, and its checkpoint
    holds the tokenizer copied from there. (A cluster's autoscaling from zero: test_autoscaling.py.)"""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ercstudy.platform.cli import main
    from ercstudy.platform.cluster.ray_runtime import local_dashboard_url

    url = local_dashboard_url()
    assert url, "the shared Ray of the tests is a local instance"
    shards = prepare_shards(f"{bucket}/text/shards")  # itself a Ray Data pipeline, on this Ray
    started = time.time()
    data = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    data["name"] = "submitted"
    data["base"]["model"].update(vocab_size=320, seq_len=SEQ)
    data["base"]["data"] = {"kind": "parquet", "path": shards, "reader": "ray_data"}  # Ray Data reads the bucket on the worker's node
    data["base"]["train"].update(tokens=STEPS * 16 * SEQ, report_every=5, checkpoint_every=STEPS)
    data["base"]["eval"] = {"every": 10, "sequences": 32, "mc_items": 0}
    data["search"] = {"sampler": "random", "num_trials": 1, "seed": 1, "params": {"erc.alpha": {"type": "float", "low": 0.5, "high": 1.2}}}
    data["scheduler"] = {"type": "none"}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data["tracking"] = {"uri": uri, "experiment": "submitted"}
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "submitted.yaml").write_text(yaml.safe_dump(data))
    MlflowClient(uri).search_experiments()  # the store's tables, before the job's driver opens it
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    job_id = f"ercstudy-test-{os.getpid()}"
    code = main(["submit", "search_spaces/submitted.yaml", "--address", url, "--job-id", job_id, "--storage", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert code == 0 and f"as Ray job {job_id}" in out and "ray job logs --follow" in out, out
    client = JobSubmissionClient(url)
    deadline = time.monotonic() + 1200
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.monotonic() < deadline:
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "leaderboard (eval/loss, min; best first)" in logs
    assert logs.rstrip().splitlines()[-1].startswith("  then http://127.0.0.1:5000/"), logs[-2000:]  # the job's last line
    # the job's log opens with the lines of Ray's job manager, written before the entrypoint starts
    lines = logs.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Running entrypoint for job")) + 1
    assert all("job_manager.py" in line for line in lines[: start - 1]), lines[:start]
    foreign = [line for line in lines[start:] if not OWN_LINE.match(line)]
    assert not foreign, foreign[:20]
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("submitted").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1
    child = children[0]
    assert child.data.tags["ercstudy.status"] == "completed" and {"eval/loss/early", "eval/loss/late"} <= child.data.metrics.keys()
    assert (tmp_path / "results" / "submitted" / "leaderboard.csv").is_file()
    # it learned from the bucket's text: every step once, finite, the loss falling
    lm = c.get_metric_history(child.info.run_id, "lm_loss")
    assert [m.step for m in lm] == list(range(5, STEPS + 1, 5)) and all(math.isfinite(m.value) for m in lm)
    assert lm[-1].value < lm[0].value - 0.3, [m.value for m in lm]
    # its checkpoint carries the tokenizer of the shards, copied from the bucket
    fs, root = pafs.FileSystem.from_uri(shards)
    with fs.open_input_stream(f"{root}/tokenizer.json") as f:
        tokenizer = f.read()
    (saved,) = (tmp_path / "results" / "submitted" / "train").glob("*/checkpoint_*/tokenizer.json")
    assert saved.read_bytes() == tokenizer and json.loads(tokenizer)["model"]["type"] == "BPE"
    # Ray Data read its batches: one ordered Parquet read from the bucket (STEPS is within one epoch), in this Ray
    from ercstudy.platform.cluster.ray_runtime import ensure_ray

    logs = Path(ensure_ray().directory) / "ray-data"
    plans = [f.read_text() for f in logs.glob("ray-data-dataset_*.log") if f.stat().st_mtime > started]
    assert len(plans) == 1 and "ReadFilesParquet" in plans[0], plans
