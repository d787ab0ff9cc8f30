"""lm-evaluation-harness on ercstudy checkpoints, `ercstudy eval` (the optional extra `evals`: pip install 'ercstudy[evals]').

The model adapter `ErcstudyLM` (an lm-eval TemplateLM scoring with the in-training scorer) lives in
the data plane, trainables/lm_eval_adapter.py, because trials run the same tasks on their own workers
(`eval.harness`); this module loads a checkpoint into it and logs results to an existing run.

`run_harness` evaluates tasks by name; tasks from local files (an lm-eval task YAML whose
`dataset_path: json` points at a local JSON/JSONL file) are found through `include_path`,
so nothing is downloaded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ercstudy.trainables.lm_eval_adapter import (  # noqa: F401  (the adapter lives in the data plane: trials run it too)
    INSTALL_HINT,
    HarnessError,
    flat_metrics,
    model_class,
    run_tasks,
)


def run_harness(checkpoint: str | Path, tasks: list[str], *, include_path: str | None = None, config: str | None = None,
                limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 16, device: str = "cpu",
                seed: int = 0) -> dict[str, Any]:
    """lm-eval's simple_evaluate on a checkpoint; returns its results dict (`results`, `configs`, ...)."""
    lm = model_class()(checkpoint, config=config, batch_size=batch_size, device=device)  # a bad checkpoint fails first, in a second
    return run_tasks(lm, tasks, include_path=include_path, limit=limit, num_fewshot=num_fewshot, seed=seed)


def log_to_mlflow(results: dict[str, Any], run_id: str, *, uri: str | None = None) -> str:
    """The metrics (at the checkpoint's step) and the whole results JSON as artifacts of an existing run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from ercstudy.platform.tracking import client as tracking

    uri = tracking.resolve_uri(uri)
    client = MlflowClient(uri)
    client.get_run(run_id)  # an unknown run fails here, before anything is written
    step = int(results.get("config", {}).get("step", 0))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in flat_metrics(results).items()])
    client.log_text(run_id, json.dumps(results, indent=2, default=str), f"harness/results_step{step}.json")
    return uri
