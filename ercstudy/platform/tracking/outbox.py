"""The study driver's MLflow writes, kept on the study's storage while the tracking server does not answer.

A study must not stop because its tracking server does. The driver writes through a `Tracker`: each
write goes to MLflow at once while the server answers; once a call fails because the server is not
answering (refused, timed out, 5xx: tracking.unavailable), that write and every later one are appended to
the outbox, STORAGE/NAME/mlflow-outbox/, one file per call (artifacts as files beside it), through
storage.py so that it lives on S3/GCS/NFS like the rest of the study: a driver that dies during the outage
loses nothing, and the next one (`ercstudy resume`) writes it first. From Tune's loop the tracker tries
again at most every RETRY_EVERY_S (a /health probe first, seconds at most), and writes the outbox back in
order, a slice of at most DRAIN_SLICE_S per loop step. The terminal gets one line when buffering starts
and one when everything is written.

Exactly once: every write is replayed until MLflow has it, so a call may reach MLflow twice (the server
wrote it and then failed to answer, or a driver died between writing an entry and removing it); each
write is idempotent: metrics carry the time they were made at (MLflow drops an identical metric), tags,
params, artifacts and statuses are set to the same values again, and a trial's run is found by its tags
before one is made. Runs made during an outage are made at drain time; until then they are named
`pending:EXPERIMENT/PARENT/TRIAL` (Tune's trial id), which the later entries of that run carry.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

from ercstudy.platform.cluster import storage as locations
from ercstudy.platform.tracking import client as tracking
from ercstudy.trainables import reports

OUTBOX = "mlflow-outbox"
RETRY_EVERY_S = 15.0  # between tries while the server does not answer
DRAIN_SLICE_S = 2.0  # the most one Tune loop step spends writing the outbox back
PROBE_TIMEOUT_S = 2.0
PENDING = "pending:"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """A report as JSON can hold it (Tune's results carry dates, numpy numbers, nested config)."""
    return json.loads(json.dumps(d, default=str))


class Outbox:
    """Calls in order, one JSON file each (`000000042.json`), a text artifact beside its call (`000000042.file`).

    An object store has no append: one object per call is what S3 and GCS can do atomically (a local file is
    written aside and renamed)."""

    def __init__(self, loc: locations.Location):
        self.loc = loc
        self._next: int | None = None

    def entries(self) -> list[str]:
        return [n for n in self.loc.children() if n.endswith(".json")]

    def __len__(self) -> int:
        return len(self.entries())

    def _write(self, loc: locations.Location, text: str) -> None:
        if loc.remote:
            loc.write_text(text)
            return
        aside = loc.parent / f".{loc.name}.{uuid.uuid4().hex[:8]}"
        aside.write_text(text)
        os.replace(aside.path, loc.path)

    def append(self, op: str, run: str | None, args: dict[str, Any], text: str | None = None) -> None:
        if self._next is None:
            self._next = max((int(n.split(".")[0]) for n in self.entries()), default=0) + 1
        seq, self._next = self._next, self._next + 1
        entry = {"op": op, "run": run, "args": args, "file": None}
        if text is not None:
            entry["file"] = f"{seq:09d}.file"
            self._write(self.loc / entry["file"], text)
        self._write(self.loc / f"{seq:09d}.json", json.dumps(entry))

    def read(self, name: str) -> dict[str, Any]:
        entry = json.loads((self.loc / name).read_text())
        if entry.get("file"):
            entry["args"]["text"] = (self.loc / entry["file"]).read_text()
        return entry

    def remove(self, name: str, entry: dict[str, Any]) -> None:
        if entry.get("file"):
            self.loc.fs.delete_file((self.loc / entry["file"]).path)
        self.loc.fs.delete_file((self.loc / name).path)

    def clear(self) -> None:
        """Written back: the directory goes (with any file a dying driver left without its entry)."""
        if self.loc.exists():
            self.loc.fs.delete_dir(self.loc.path)


# ---------------------------------------------------------------------------------------------
# The calls an outbox holds: op(client, run_id, **args); each idempotent (see the module's docstring)


def _trial_run(c: Any, _run: None, *, experiment_id: str, parent_run_id: str, trial_id: str, name: str,
               config: dict[str, Any], params: dict[str, Any], tags: dict[str, str]) -> tuple[str, int]:
    """The trial's run (found by its tags, else made), with its params and config; and the last step it holds."""
    found = c.search_runs([experiment_id], max_results=1, filter_string=tracking.tag_filter(
        **{tracking.TRIAL_TAG: trial_id, tracking.PARENT_TAG: parent_run_id}))
    if found:
        run_id = found[0].info.run_id
        if len(found[0].data.params) < len(tracking.flat_params(config)) + len(params):  # made, then the server went away
            tracking.log_trial_config(c, run_id, config, params)
        return run_id, tracking.last_logged_step(c, run_id)
    run_id = tracking.start_trial_run(c, experiment_id, name=name, config=config, params=params, parent_run_id=parent_run_id,
                                      tags=tags)
    return run_id, -1


def _log_batch(c: Any, run: str, *, metrics: list, params: list, tags: list) -> None:
    from mlflow.entities import Metric, Param, RunTag

    c.log_batch(run, metrics=[Metric(*m) for m in metrics], params=[Param(*p) for p in params], tags=[RunTag(*t) for t in tags],
                synchronous=True)


OPS = {
    "trial_run": _trial_run,
    "log_batch": _log_batch,
    "log_result": lambda c, run, *, result, timestamp_ms: tracking.log_result(c, run, result, timestamp_ms=timestamp_ms),
    "finish_trial_run": lambda c, run, *, status, final, note: tracking.finish_trial_run(c, run, status, final, note=note),
    "set_tag": lambda c, run, *, key, value: c.set_tag(run, key, value),
    "set_terminated": lambda c, run, *, status: c.set_terminated(run, status=status),
    "log_metric": lambda c, run, *, key, value, timestamp, step: c.log_metric(run, key, value, timestamp=timestamp, step=step),
    "log_text": lambda c, run, *, text, artifact_file: c.log_text(run, text, artifact_file),
}


class Tracker:
    """An MlflowClient for the study driver: the writes below go through the outbox when the server does not
    answer; everything else (reads, run creation before the first trial) is the client's own."""

    def __init__(self, uri: str, outbox: locations.Location | None, *, out: Any = None):
        """outbox None: nothing is buffered (a failing call raises, as the plain client's does)."""
        self.uri, self.client, self.outbox = uri, tracking.client(uri), Outbox(outbox) if outbox is not None else None
        self.out = out
        self.runs: dict[str, str] = {}  # pending name -> the run made at drain time
        self.floors: dict[str, int] = {}  # pending name -> the last step its run held when found (not written again)
        self.buffering = self.outbox is not None and len(self.outbox) > 0  # a previous driver's: written before any new one
        self.since: float | None = None
        self.next_try = 0.0
        self.written = 0  # calls of this outage written back so far

    def __getattr__(self, name: str) -> Any:  # reads: the client's
        if name == "client":  # not made yet
            raise AttributeError(name)
        return getattr(self.client, name)

    # -- the driver's writes ----------------------------------------------------------------

    def trial_run(self, *, experiment_id: str, parent_run_id: str, trial_id: str, name: str, config: dict[str, Any],
                  params: dict[str, Any], tags: dict[str, str]) -> tuple[str, int]:
        """The trial's run (found by its tags, else made) and the last step it holds; while buffering, its pending
        name and -1 (the run is found or made when the outbox is written back; steps it held are not written again)."""
        made = self._write("trial_run", None, experiment_id=experiment_id, parent_run_id=parent_run_id, trial_id=trial_id,
                           name=name, config=_jsonable(config), params=_jsonable(params), tags=tags)
        return made or (f"{PENDING}{experiment_id}/{parent_run_id}/{trial_id}", -1)

    def log_result(self, run_id: str, result: dict[str, Any]) -> None:

        kept = {**tracking.numeric_metrics(result), "step": int(result.get("step", 0)),
                **{k: result[k] for k in (reports.HARNESS_RESULTS, reports.HARNESS_ERROR) if isinstance(result.get(k), str)}}
        self._write("log_result", run_id, result=kept, timestamp_ms=int(time.time() * 1000))

    def finish_trial_run(self, run_id: str, status: str, final: dict[str, Any] | None, *, note: str = "") -> None:
        self._write("finish_trial_run", run_id, status=status, final=_jsonable(final or {}), note=note)

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = (), synchronous: Any = None) -> None:
        now = int(time.time() * 1000)
        self._write("log_batch", run_id, metrics=[[m.key, m.value, m.timestamp or now, m.step or 0] for m in metrics],
                    params=[[p.key, p.value] for p in params], tags=[[t.key, t.value] for t in tags])

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self._write("set_tag", run_id, key=key, value=str(value))

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        self._write("set_terminated", run_id, status=status)

    def log_metric(self, run_id: str, key: str, value: float, timestamp: int | None = None, step: int | None = None) -> None:
        self._write("log_metric", run_id, key=key, value=float(value), timestamp=timestamp or int(time.time() * 1000),
                    step=step or 0)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._write("log_text", run_id, text=text, artifact_file=artifact_file)

    # -- buffering ----------------------------------------------------------------------------

    def is_outage(self, err: BaseException) -> bool:
        """Whether `err` means the server is not answering; if so, later writes are buffered (reads: the caller's)."""
        if self.outbox is None or not tracking.unavailable(err):
            return False
        self._start_buffering(err)
        return True

    def _write(self, op: str, run: str | None, **args: Any) -> Any:
        if not self.buffering:
            try:
                return OPS[op](self.client, self.resolve(run), **args)
            except Exception as err:
                if not self.is_outage(err):
                    raise
        text = args.pop("text", None)
        self.outbox.append(op, run, args, text)
        return None

    def _say(self, line: str) -> None:
        print(line, file=self.out or sys.stderr, flush=True)

    def _start_buffering(self, err: BaseException) -> None:
        if self.buffering:
            return
        self.buffering, self.since, self.next_try = True, time.monotonic(), time.monotonic() + RETRY_EVERY_S
        self._say(f"ercstudy: MLflow at {self.uri} is not answering; buffering to {self.outbox.loc}/ "
                  f"({len(self.outbox) + 1} calls; trying again every {RETRY_EVERY_S:.0f} s; {type(err).__name__})")

    def resolve(self, run: str | None) -> str | None:
        """A run id for a call: a pending run's, found by its tags when a previous driver made it."""
        if not run or not run.startswith(PENDING):
            return run
        if run not in self.runs:
            exp, parent, trial = run[len(PENDING):].split("/")
            found = self.client.search_runs([exp], max_results=1, filter_string=tracking.tag_filter(
                **{tracking.TRIAL_TAG: trial, tracking.PARENT_TAG: parent}))
            if not found:
                raise tracking.TrackingError(f"MLflow holds no run for trial {trial} of parent run {parent}")
            self.runs[run] = found[0].info.run_id
        return self.runs[run]

    def _replay(self, entry: dict[str, Any]) -> None:
        op, run, args = entry["op"], entry["run"], entry["args"]
        if op == "trial_run":
            pending = f"{PENDING}{args['experiment_id']}/{args['parent_run_id']}/{args['trial_id']}"
            self.runs[pending], self.floors[pending] = OPS[op](self.client, None, **args)
            return
        if op == "log_result" and int(args["result"].get("step", 0)) <= self.floors.get(run, -1):
            return  # the run held this step already when it was found: each step once
        OPS[op](self.client, self.resolve(run), **args)

    def tick(self) -> None:
        """From Tune's loop: while buffering, try again when it is time (a slice of the outbox at a time)."""
        if self.buffering and time.monotonic() >= self.next_try:
            self.drain(DRAIN_SLICE_S)

    def drain(self, budget_s: float | None = None) -> bool:
        """Write the outbox back in order, for at most `budget_s` (None: all); True when nothing is left."""
        if not self.buffering:
            return True
        started = time.monotonic()
        try:
            tracking.check_reachable(self.uri, timeout_s=PROBE_TIMEOUT_S)
        except tracking.TrackingError:
            self.next_try = time.monotonic() + RETRY_EVERY_S
            return False
        for name in self.outbox.entries():
            entry = self.outbox.read(name)
            try:
                self._replay(entry)
            except Exception as err:
                if tracking.unavailable(err):
                    self.next_try = time.monotonic() + RETRY_EVERY_S
                    return False
                # refused by the server (a 4xx, a run deleted by hand): writing it again would be refused again and
                # hold back everything after it
                self._say(f"ercstudy: MLflow refused a buffered {entry['op']} call ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300] if str(err) else ''}); dropped it")
            self.outbox.remove(name, entry)
            self.written += 1
            if budget_s is not None and time.monotonic() - started > budget_s:
                self.next_try = 0.0  # more at the next loop step
                return False
        self.outbox.clear()
        outage = f", {time.monotonic() - self.since:.0f} s after it stopped answering" if self.since is not None else ""
        self._say(f"ercstudy: MLflow at {self.uri} answers again; wrote the {self.written} buffered calls{outage}")
        self.buffering, self.since, self.written = False, None, 0
        return True

    def close(self, wait_s: float = 30.0) -> None:
        """At the study's end: write what is left, waiting up to `wait_s` for the server; else say where it stays."""
        deadline = time.monotonic() + wait_s
        while not self.drain():
            if time.monotonic() >= deadline:
                self._say(f"ercstudy: MLflow at {self.uri} is still not answering: {len(self.outbox)} calls stay in "
                          f"{self.outbox.loc}/; `ercstudy resume` writes them once it answers")
                return
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


_trackers: dict[tuple[str, str], Tracker] = {}


def tracker(uri: str, outbox: str | locations.Location | None) -> Tracker:
    """This process's tracker for a study (the runner and its Tune callback share one outbox, in one order)."""
    loc = outbox if isinstance(outbox, locations.Location) or outbox is None else locations.resolve(outbox)
    key = (uri, loc.uri if loc is not None else "")
    if key not in _trackers:
        tracking.fail_fast()
        _trackers[key] = Tracker(uri, loc)
    return _trackers[key]
