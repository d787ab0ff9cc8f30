"""What `ercstudy train` prints while its trial trains: one line per report, written by the driver.

The workers print nothing to the terminal (their output stays in Ray's logs). Ray Train's
controller hands every report to `trial.ReportQueueCallback`, which puts its metrics
into a Ray queue; `TrainProgress` reads that queue in a thread of the driver and prints a line
per report as it arrives:

    step  50/100 | lm 1.8907 | lb 1.0328 | erc 2.58e-05 | alpha* 0.86 | eps 0.640 | cos 0.090 | nmi 0.163 | lr 1.88e-03 | 3,243 tok/s
"""

from __future__ import annotations

import queue as stdlib_queue
import sys
import threading
import time
from typing import Any, TextIO

from ray import tune

from ercstudy.platform.study.plan import StudyPlan
from ercstudy.platform.study.tables import cell
from ercstudy.platform.tracking import client as tracking
from ercstudy.trainables import reports
from ercstudy.trainables.config import TrialConfig

_END = "ercstudy.progress.end"  # what stop() puts last: the reader ends on it


def progress_line(cfg: TrialConfig, m: dict[str, Any]) -> str:
    """One report as a line: step, losses, specialization, eval, lr, throughput."""
    parts = [
        f"step {m[reports.STEP]:>{len(str(cfg.steps))}}/{cfg.steps}",
        f"lm {m['lm_loss']:.4f}",
        f"lb {m['lb_loss']:.4f}",
        f"erc {m['erc_loss']:.2e}",
        f"alpha* {m['alpha_star']:.2f}",
        *([f"eps {m['eps_mean']:.3f}", f"cos {m['router_cos']:.3f}"] if "eps_mean" in m else []),  # none without a router (AoE)
    ]
    if "domain_nmi" in m:
        parts.append(f"nmi {m['domain_nmi']:.3f}")
    if "eval/loss" in m:
        parts.append(f"eval {m['eval/loss']:.4f}")
    if "eval/mc_domain/acc" in m:
        parts.append(f"mc {m['eval/mc_domain/acc']:.2f}")
    parts += [f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:,.0f} tok/s"]
    return " | ".join(parts)


def report_queue() -> Any:
    """The queue the Train controller puts reports into: a Ray actor that holds no CPU."""
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


class TrainProgress:
    """Prints a line per report of one trial, in a thread of the driver, as reports arrive in `queue`
    (a ray.util.queue.Queue that the Train controller puts them into; any queue with put/get works).

    Use it as a context manager around the trial: leaving the block waits until every report put
    before it has been printed, so that the caller's summary comes last.
    """

    def __init__(self, cfg: TrialConfig, queue: Any, *, out: TextIO | None = None):
        self.cfg, self.queue, self.out = cfg, queue, out or sys.stdout
        self.resumed: int | None = None  # the last resumed_from_step a report carried
        self._thread = threading.Thread(target=self._read, name="ercstudy-train-progress", daemon=True)

    def __enter__(self) -> TrainProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.queue.put(_END)
        self._thread.join()

    def _read(self) -> None:
        while True:
            try:
                item = self.queue.get(block=True)
            except stdlib_queue.Empty:  # ray.util.queue.Empty is one
                continue
            if item == _END:
                return
            try:
                self.show(item)
            except Exception as err:  # a malformed report must not end the reader: the trial goes on
                print(f"ercstudy: could not show a report ({type(err).__name__}: {err})", file=self.out, flush=True)

    def show(self, item: dict[str, Any]) -> None:
        if "message" in item:  # a note from the controller's callbacks (e.g. MLflow logging failed)
            print(item["message"], file=self.out, flush=True)
            return
        resumed = None
        if reports.RESUMED_FROM_STEP in item:  # the worker's first report after a restore says where it started
            resumed = item[reports.RESUMED_FROM_STEP] if item[reports.RESUMED_FROM_STEP] != self.resumed else None
            self.resumed = item[reports.RESUMED_FROM_STEP]
        if resumed:
            print(f"resumed from checkpoint at step {resumed}", file=self.out, flush=True)
        line = f"stopping: {item[reports.STOP_REASON]}" if item.get(reports.STOP_REASON) else progress_line(self.cfg, item)
        print(line, file=self.out, flush=True)


class ProgressCallback(tune.Callback):
    """The study's progress at most every `every_s` seconds, bounded to one screen whatever the trial count: a
    summary (done, running, pending, the best so far), the running trials and the last few finished; and a line per
    finished trial as it ends."""

    RUNNING_SHOWN = 12  # running trials listed (the rest counted)
    FINISHED_SHOWN = 3  # the latest finished trials listed

    def __init__(self, plan: StudyPlan, every_s: float = 30.0):
        self.plan, self.study, self.every_s = plan, plan.study, every_s
        self.last = 0.0
        self.started = time.monotonic()
        self.finished: list[str] = []  # trial ids, in the order they ended

    @property
    def out(self) -> Any:
        return sys.stdout

    def _row(self, trial: Any, status: str | None = None) -> str:
        r = trial.last_result or {}
        status = status or trial.status
        params = " ".join(f"{p.split('.')[-1]}={cell(v)}" for p, v in trial.config.get("params", {}).items())
        objs = " ".join(f"{o.metric}={cell(r[o.metric])}" for o in self.study.objectives if o.metric in r)
        step = f"step {r[reports.STEP]}/{r.get(reports.TOTAL_STEPS, '?')}" if "step" in r else "starting"
        return f"  {trial.trial_id:<14} {status:<13} {step:<14} {params} | {objs}"

    def _best(self, trials: list) -> str:
        o = self.study.objective
        scored = [(t.last_result[o.metric], t.trial_id) for t in trials if isinstance((t.last_result or {}).get(o.metric), (int, float))]
        if not scored:
            return ""
        value, trial_id = (min if o.mode == "min" else max)(scored)
        return f", best {o.metric} {cell(value)} ({trial_id})"

    def screen(self, trials: list, now: float) -> list[str]:
        """What one progress print shows: at most 2 + RUNNING_SHOWN + 1 + FINISHED_SHOWN + 1 lines."""
        done = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        running = [t for t in trials if t.status == "RUNNING"]
        pending = self.plan.num_trials - len(done) - len(running)
        lines = [f"[{self.study.name}] {now - self.started:,.0f} s | {len(done)}/{self.plan.num_trials} trials done, "
                 f"{len(running)} running, {pending} pending{self._best(trials)}"]
        lines += [self._row(t) for t in running[:self.RUNNING_SHOWN]]
        if len(running) > self.RUNNING_SHOWN:
            lines.append(f"  ... and {len(running) - self.RUNNING_SHOWN} more running")
        by_id = {t.trial_id: t for t in done}
        latest = [by_id[i] for i in self.finished if i in by_id][-self.FINISHED_SHOWN:]
        if latest:
            lines.append("  last finished:")
            lines += [self._row(t) for t in latest]
        return lines

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s or not trials:
            return
        self.last = now
        print("\n".join(self.screen(trials, now)), file=self.out, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune marks the trial TERMINATED only after its callbacks: say how it ended instead
        final = trial.last_result or {}
        status = tracking.trial_status(final, final.get(reports.TOTAL_STEPS))
        self.finished.append(trial.trial_id)
        print(f"[{self.study.name}] finished{self._row(trial, status)[1:]}", file=self.out, flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished.append(trial.trial_id)
        print(f"[{self.study.name}] FAILED  {self._row(trial)[2:]} (error: {trial.error_file})", file=self.out, flush=True)
