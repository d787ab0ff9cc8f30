"""The outbox (tracking/outbox.py): the study driver's MLflow writes wait on disk (or in a bucket) while the
server does not answer, and a later driver writes them back in order, once each. No server here: a closed port,
and a SQLite store to write back to (tests/integration/test_tracking_server.py runs a real `mlflow server`)."""

import time
from pathlib import Path

import pytest

from ercstudy.netutil import free_port
from ercstudy.platform.cluster import storage as locations
from ercstudy.platform.tracking import client as tracking
from ercstudy.platform.tracking import outbox

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# The outbox, without a server


def report(step, total=30):
    return {"step": step, "total_steps": total, "lm_loss": 5.0 - step / 10, "eval/loss": 5.2 - step / 10, "date": "today",
            "config": {"params": {"erc.alpha": 0.8}}}


@pytest.fixture()
def sqlite_store(tmp_path):
    """A SQLite store with an experiment and a study's parent run: where a later driver writes the outbox back."""
    uri = tracking.resolve_uri(f"sqlite:///{tmp_path}/mlflow.db")
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "outbox")
    parent = c.create_run(exp, run_name="study").info.run_id
    return uri, c, exp, parent


def buffered_trial(t: outbox.Tracker, exp: str, parent: str, trial_id: str = "abc_00000") -> str:
    """What the study callback writes for one trial (outbox.Tracker's write calls)."""
    run, logged = t.trial_run(experiment_id=exp, parent_run_id=parent, trial_id=trial_id, name=f"s-{trial_id}",
                              config={"erc": {"alpha": 0.8}, "moe": {"num_experts": 4}}, params={"erc.alpha": 0.8},
                              tags={tracking.TRIAL_TAG: trial_id, tracking.STUDY_TAG: "s"})
    assert logged == -1
    for step in (10, 20, 30):
        t.log_result(run, report(step))
    final = {**report(30), "coupling_matrix": [[[0.5, 0.1], [0.2, 0.4]]]}
    t.finish_trial_run(run, "completed", final)
    return run


def test_a_failed_call_costs_seconds_and_what_it_could_not_write_waits_on_disk(sqlite_store, tmp_path, capsys):
    from mlflow.entities import Param

    uri, c, exp, parent = sqlite_store
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    box = locations.resolve(str(tmp_path / "study")) / outbox.OUTBOX
    t = outbox.Tracker(down, box)
    tracking.fail_fast()
    started = time.monotonic()
    run = buffered_trial(t, exp, parent)
    t.log_text(parent, "trial,status\nabc_00000,completed\n", "leaderboard.csv")
    t.set_tag(parent, tracking.STATUS_TAG, "completed")
    t.log_batch(parent, params=[Param("sampler", "random")], synchronous=True)
    elapsed = time.monotonic() - started
    assert run == f"pending:{exp}/{parent}/abc_00000" and t.buffering
    assert elapsed < 6, elapsed  # the first call's short retries (a refused connection: ~2 s); the rest: no network
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ercstudy:")]
    assert len(lines) == 1 and lines[0].startswith(f"ercstudy: MLflow at {down} is not answering; buffering to {box}/ (1 calls"), lines
    names = box.children()
    assert len([n for n in names if n.endswith(".json")]) == 8 and "000000006.file" in names, names  # the csv, as a file
    t.drain()  # still down: nothing is lost, nothing said
    assert len(t.outbox) == 8 and capsys.readouterr().err == ""
    print(f"\na failed MLflow call with ercstudy's retries: {elapsed:.1f} s for all 8 calls")

    # the driver dies; the next one (a resumed study) writes the outbox back first, in order
    later = outbox.Tracker(uri, box)
    assert later.buffering and later.drain()
    assert "answers again; wrote the 8 buffered calls" in capsys.readouterr().err
    assert not box.exists()
    runs = c.search_runs([exp], filter_string=tracking.tag_filter(**{tracking.TRIAL_TAG: "abc_00000"}))
    assert len(runs) == 1
    r = runs[0]
    assert r.data.tags[tracking.PARENT_TAG] == parent and r.data.tags[tracking.STATUS_TAG] == "completed"
    assert r.info.status == "FINISHED" and r.data.params["search.erc.alpha"] == "0.8"
    assert [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, "lm_loss")] == [(10, 4.0), (20, 3.0), (30, 2.0)]
    paths = {a.path for a in c.list_artifacts(r.info.run_id)} | {a.path for a in c.list_artifacts(r.info.run_id, "plots")}
    assert {"trial_config.yaml", "coupling_matrices.json", "eval_table.json", "plots/specialization.png"} <= paths, paths
    assert c.get_run(parent).data.tags[tracking.STATUS_TAG] == "completed" and c.get_run(parent).data.params["sampler"] == "random"
    assert "leaderboard.csv" in {a.path for a in c.list_artifacts(parent)}


def test_an_outbox_written_back_twice_adds_nothing_twice(sqlite_store, tmp_path, capsys):
    """A driver may die after MLflow took a call and before the call left the outbox: it is written again."""
    import shutil

    uri, c, exp, parent = sqlite_store
    box = locations.resolve(str(tmp_path / "box"))
    buffered_trial(outbox.Tracker(f"http://127.0.0.1:{free_port()}", box), exp, parent)
    shutil.copytree(box.path, tmp_path / "copy")
    assert outbox.Tracker(uri, box).drain()
    shutil.copytree(tmp_path / "copy", box.path)  # as if none of it had been removed
    again = outbox.Tracker(uri, box)
    again.log_result(f"pending:{exp}/{parent}/abc_00000", report(40, total=40))  # a call after the old ones: after them
    assert again.drain()
    runs = c.search_runs([exp], filter_string=tracking.tag_filter(**{tracking.TRIAL_TAG: "abc_00000"}))
    assert len(runs) == 1  # found by its tags, not made again
    assert [m.step for m in c.get_metric_history(runs[0].info.run_id, "lm_loss")] == [10, 20, 30, 40]
    assert [m.step for m in c.get_metric_history(runs[0].info.run_id, "eval/loss")] == [10, 20, 30, 40]


def test_a_call_the_server_refuses_is_dropped_and_the_rest_written(sqlite_store, tmp_path, capsys):
    uri, c, exp, parent = sqlite_store
    box = locations.resolve(str(tmp_path / "box"))
    t = outbox.Tracker(f"http://127.0.0.1:{free_port()}", box)
    t.set_tag("0" * 32, "k", "v")  # a run that does not exist: refused (404) once written back
    t.set_tag(parent, "k", "v")
    assert outbox.Tracker(uri, box).drain()
    assert "refused a buffered set_tag call" in capsys.readouterr().err
    assert c.get_run(parent).data.tags["k"] == "v"


def test_what_counts_as_the_server_not_answering():
    import requests
    from mlflow.exceptions import MlflowException, RestException

    assert tracking.unavailable(MlflowException("API request to http://h/api/2.0/mlflow/runs/get failed with exception "
                                                "HTTPConnectionPool(...): Max retries exceeded"))
    assert tracking.unavailable(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "x"}))
    assert tracking.unavailable(ConnectionRefusedError()) and tracking.unavailable(requests.ConnectionError())
    assert not tracking.unavailable(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}))
    assert not tracking.unavailable(MlflowException("Changing param values is not allowed"))
    assert not tracking.unavailable(ValueError("a bug"))


def test_an_outbox_in_a_bucket(bucket):
    box = outbox.Outbox(locations.resolve(bucket) / "s" / outbox.OUTBOX)
    box.append("set_tag", "r1", {"key": "k", "value": "v"})
    box.append("log_text", "r1", {"artifact_file": "a.txt"}, text="hello")
    again = outbox.Outbox(box.loc)  # another driver: the order continues
    again.append("set_terminated", "r1", {"status": "FINISHED"})
    names = again.entries()
    assert names == ["000000001.json", "000000002.json", "000000003.json"]
    entries = [again.read(n) for n in names]
    assert [e["op"] for e in entries] == ["set_tag", "log_text", "set_terminated"] and entries[1]["args"]["text"] == "hello"
    for n, e in zip(names, entries):
        again.remove(n, e)
    assert again.loc.children() == []
    again.clear()
