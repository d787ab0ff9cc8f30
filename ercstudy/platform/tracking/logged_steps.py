"""Each step once in MLflow, live: a trial's reports logged as they arrive, a repeated step never again."""

from __future__ import annotations

from typing import Any

from ercstudy.trainables import reports


class LoggedSteps:
    """Which of a trial's steps its MLflow run holds: every report is logged as it arrives (the curves are live),
    and a report of a step at or below the last one logged is not logged again.

    A worker group that Ray Train restarts resumes from its last checkpoint and reports the steps after it again;
    those repeats are skipped, so a restored trial's curve holds, for the steps between that checkpoint and the
    failure, the values the failed attempt reported, and the restarted attempt's from the next step on. Resume is
    exact on CPU (the repeats equal what was logged) and near-exact on GPU. `logged`: the last step the run
    already holds (a resumed driver reads it from MLflow).
    """

    def __init__(self, logged: int = -1):
        self.logged = logged

    def new(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        """[result] when its step is beyond the last one logged (to log now), else []."""
        step = int(result.get(reports.STEP, 0))
        if step <= self.logged:
            return []
        self.logged = step
        return [result]

    def restored(self, history: list[dict[str, Any]], upto: int) -> list[dict[str, Any]]:
        """The reports a restored checkpoint holds (the worker's first report after a restore, up to step
        `upto`): those MLflow does not have yet, e.g. when a driver died after Ray Train had the checkpoint and
        before it logged the reports before it, to log now."""
        out = [r for r in history if self.logged < int(r.get(reports.STEP, 0)) <= upto]
        if out:
            self.logged = int(out[-1].get(reports.STEP, 0))
        return out
