"""The `eval.harness` section of a trial config: lm-eval tasks a trial runs on its own model, and when.

Its own small module, apart from harness.py (the adapter and the evaluation): EvalConfig (evals.py)
holds it, and harness.py imports evals.py and checkpoint.py, so the section must import neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from ercstudy.trainables.validation import require


@dataclass(frozen=True, kw_only=True)
class HarnessConfig:
    """The `eval.harness` section: lm-eval tasks a trial runs on its own model, and when."""

    tasks: tuple[str, ...] = ()  # lm-eval task, group or tag names; none: no harness evaluation
    include_path: str | None = None  # a directory of local task YAMLs (e.g. evals/tasks)
    data_dir: str | None = None  # where the task YAMLs' relative data_files are read from (default: where the study starts)
    at: int | Literal["final"] = "final"  # final: at the last step; N: every N steps (a multiple of train.report_every) and the last
    limit: float | None = None  # items per task: a count (>= 1) or a fraction (< 1) of each task
    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int = 16  # rows per forward

    def __post_init__(self) -> None:
        require(all(isinstance(t, str) and t.strip() for t in self.tasks), "tasks", f"must be lm-eval task names, got {list(self.tasks)}")
        require(len(set(self.tasks)) == len(self.tasks), "tasks", f"names a task twice: {list(self.tasks)}")
        require(self.at == "final" or self.at >= 1, "at", f"must be 'final' or a number of steps >= 1, got {self.at!r}")
        require(self.limit is None or self.limit > 0, "limit", f"must be > 0 (a count, or a fraction < 1), got {self.limit}")
        require(self.num_fewshot is None or self.num_fewshot >= 0, "num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def due(self, step: int, last: int) -> bool:
        return self.enabled and (step == last or (self.at != "final" and step % self.at == 0))


def _resolved_dir(value: str | None, cwd: str) -> str | None:
    if value is None or "://" in value:
        return value
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(value)))


def with_absolute_paths(trial: dict[str, Any], cwd: str | None = None) -> dict[str, Any]:
    """A trial config (as a dict) whose eval.harness include_path and data_dir are absolute, relative ones read
    from `cwd` (default: this process's working directory), data_dir defaulting to it: the workers run elsewhere."""
    ev = trial.get("eval")
    harness = ev.get("harness") if isinstance(ev, dict) else None
    if not isinstance(harness, dict) or not harness.get("tasks"):
        return trial
    cwd = cwd or os.getcwd()
    fixed = {**harness, "include_path": _resolved_dir(harness.get("include_path"), cwd),
             "data_dir": _resolved_dir(harness.get("data_dir") or ".", cwd)}
    return {**trial, "eval": {**trial["eval"], "harness": fixed}}
