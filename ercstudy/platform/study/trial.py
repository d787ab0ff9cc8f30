"""One trial as a Ray Train run: a TorchTrainer of DeepSpeed workers (trainables/worker.py).

Called by the study's Tune trainable (runner.py) and by `ercstudy train`; never raises for a
failed trial, it returns why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ray.train import UserCallback

from ercstudy.platform.cluster import private_apis
from ercstudy.trainables import reports
from ercstudy.trainables.config import CONFIG_KEY, TrialConfig


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train's entry on every worker. The training stack (DeepSpeed, which imports MLflow) loads here, in the
    workers only: the trial's Tune actor and Ray Train's controller unpickle this function by reference to this
    module, and a direct reference to trainables/worker.py cost each of them about a second of CPU and the memory of
    DeepSpeed, per trial, on the head node where they live."""
    from ercstudy.trainables.private_apis import import_deepspeed_without_mlflow

    import_deepspeed_without_mlflow()
    from ercstudy.trainables.worker import train_loop_per_worker as loop

    return loop(config)


@dataclass(frozen=True)
class TrialResult:
    history: list[dict[str, Any]]  # one entry per report, in step order, no step twice
    checkpoint_path: str | None  # the last DeepSpeed checkpoint
    path: str  # the run directory (Ray Train storage)
    error: str | None  # why the trial failed, if it did
    stop_reason: str | None  # why the trial stopped early (e.g. a non-finite loss), if it did

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def run_trial(cfg: TrialConfig, *, name: str, storage_path: str, callbacks: list[Any] | None = None) -> TrialResult:
    """Run one trial as a TorchTrainer on the connected (or a new local) Ray."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        from ercstudy.platform.cluster.ray_runtime import ensure_ray

        ensure_ray()
    cfg.check_data()
    res = cfg.resources
    from ercstudy.platform.cluster.capacity import cluster_capacity, cpu_need

    need, spare, words = cpu_need(res.num_workers * res.cpus_per_worker, cfg.data)
    # with Ray Data, a trial that leaves no CPU free would wait for good: a study has checked (runner.concurrency),
    # `ercstudy train` is checked here
    if spare and need > (have := cluster_capacity().cpus):
        return TrialResult([], None, os.path.join(storage_path, name), f"resources: the trial needs {words}, the cluster has {have:g}", None)
    use_gpu = res.gpus_per_worker > 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        # the config itself, not its dict: the workers get the validated dataclass (Ray pickles it)
        train_loop_config={CONFIG_KEY: cfg},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=os.path.abspath(storage_path) if "://" not in storage_path else storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # DeepSpeed picks its accelerator once, at import: each worker names its own, from its resources
            # (a worker inherits its node's environment, and a driver on a CPU machine may have set cpu there).
            worker_runtime_env={"env_vars": {**private_apis.WORKER_SETTINGS, "DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}},
            callbacks=callbacks or [],
            # Ray Train's INFO lines repeat every metric of every report; its warnings stay. Progress is ours.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    private_apis.without_datasets_callback(trainer)
    try:
        result = trainer.fit()
    except Exception as err:  # TrainingFailedError: workers failed more than max_failures times
        return TrialResult([], None, os.path.join(storage_path, name), f"{type(err).__name__}: {err}".splitlines()[0], None)
    history = list(result.return_value or [])
    stop_reason = history[-1].get(reports.STOP_REASON) if history else None
    error = f"{type(result.error).__name__}: {result.error}".splitlines()[0] if result.error else None
    return TrialResult(history, result.checkpoint.path if result.checkpoint else None, result.path, error, stop_reason)


class ReportQueueCallback(UserCallback):
    """Puts rank 0's metrics of every report into `queue`, a ray.util.queue.Queue read in another process:
    `ercstudy train`'s progress lines (progress.py), a study trial's reports to Tune (tune_trial). It runs in the
    Train controller. `drop`: keys not forwarded (the coupling matrices: too large for a progress queue, and no line
    shows them); `checkpoint_key`: where the path of the report's checkpoint rides along, if it has one. A checkpoint-only report
    (saved before its step's evaluations) is not forwarded: its checkpoint rides with the step's report."""

    def __init__(self, queue: Any, *, drop: tuple[str, ...] = (reports.COUPLING_MATRIX,), checkpoint_key: str | None = None):
        self.queue, self.drop, self.checkpoint_key = queue, drop, checkpoint_key
        self.checkpoint: Any = None  # a checkpoint-only report's, forwarded with the step's own report after it

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if reports.checkpoint_only(metrics[0]):
            self.checkpoint = checkpoint
            return
        forwarded = {k: v for k, v in metrics[0].items() if k not in self.drop}
        checkpoint, self.checkpoint = checkpoint or self.checkpoint, None
        if self.checkpoint_key and checkpoint is not None:
            forwarded[self.checkpoint_key] = checkpoint.path
        try:
            self.queue.put(forwarded)
        except Exception as err:  # the reader went away (a stopped trial): never stop training for it
            print(f"ercstudy: could not forward the report of step {metrics[0].get(reports.STEP)}: {type(err).__name__}: {err}", flush=True)


def tune_trial(cfg: TrialConfig, *, name: str, storage_path: str) -> TrialResult:
    """run_trial inside a Tune trial: every report of the Train run reaches Tune once and in order, from the trial's
    own thread, and the trial returns only after its last report.

    Not Ray's TuneReportCallback, which can hang the trial for good (ray 2.60): it hands each report to the Tune
    actor's main thread, which puts it into the trial session's one-slot result queue, while the trial's thread, once
    fit() returns, puts Tune's end-of-function result into the same slot. When the last report and the end arrive
    together, the main thread blocks on the full slot, which only it empties (stack: ray/train/_internal/session.py
    `_get_result_from_queues` -> `_report_training_result` -> `queue.put`). Seen in 1 of 3 three-trial studies on
    2 busy cores. Here fit() runs in a thread of its own and the trial's thread is the only one that reports.
    """
    import threading

    from ray import tune

    from ercstudy.platform.study import relay

    channel = relay.Channel(storage_path, name)  # this trial's slot of the study's relay (driver.fit started it)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = run_trial(cfg, name=name, storage_path=storage_path,
                                          callbacks=[ReportQueueCallback(channel, drop=(), checkpoint_key=reports.CHECKPOINT_PATH)])
        except BaseException as err:  # raised in the trial's thread below
            outcome["error"] = err

    fitting = threading.Thread(target=fit, name="ercstudy-fit", daemon=True)
    fitting.start()
    # once fit() has returned, every report was put (a put returns once the slot holds it): what is left is there
    while True:
        running = fitting.is_alive()
        got, item = channel.get(timeout=1.0 if running else 0.0)
        if got:
            tune.report(item)
        elif not running:
            break
    channel.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
