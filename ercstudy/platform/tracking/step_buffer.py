"""Each step once in MLflow: a trial's reports held until a checkpoint covers them."""

from __future__ import annotations

from typing import Any

from ercstudy.trainables import reports


class StepBuffer:
    """A trial's reports, held until a checkpoint covers them, so that MLflow records each step once,
    with the values of the run that continued.

    A worker group that Ray Train restarts resumes from its last checkpoint and reports the steps
    after it again: the held reports of the failed attempt at those steps are dropped instead of
    logged twice. Reports are released at a checkpoint, at the trial's last report and when the
    trial ends (`flush`); steps at or below `logged` (already in MLflow, e.g. before a driver
    restart) are never released again.
    """

    def __init__(self, logged: int = -1):
        self.logged = logged
        self.pending: list[dict[str, Any]] = []

    def add(self, result: dict[str, Any], *, checkpointed: bool) -> list[dict[str, Any]]:
        """Hold `result`; return the reports to log now (in step order)."""
        step = int(result.get(reports.STEP, 0))
        self.pending = [r for r in self.pending if int(r.get(reports.STEP, 0)) < step]  # a restart repeats these
        self.pending.append(result)
        last = step >= int(result.get(reports.TOTAL_STEPS, step + 1)) or bool(result.get(reports.STOP_REASON))
        return self.flush() if checkpointed or last else []

    def restored(self, history: list[dict[str, Any]], upto: int) -> list[dict[str, Any]]:
        """The reports a restored checkpoint holds (the worker's first report after a restore, up to step
        `upto`): those MLflow does not have yet, e.g. when a driver died after Ray Train had the checkpoint and
        before it logged the reports before it, to log now."""
        out = [r for r in history if self.logged < int(r.get(reports.STEP, 0)) <= upto]
        if out:
            self.logged = int(out[-1].get(reports.STEP, 0))
        return out

    def flush(self) -> list[dict[str, Any]]:
        out = [r for r in self.pending if int(r.get(reports.STEP, 0)) > self.logged]
        self.pending = []
        if out:
            self.logged = int(out[-1].get(reports.STEP, 0))
        return out
