"""The Ray Train worker of a trial: set-up, restore, the training loop, reports and checkpoints.

Layers by role, as in Ray's Train+Tune examples: `train_loop_per_worker` (this file, on every
worker) <- `platform.trial.run_trial` (one TorchTrainer per trial) <- the study driver (platform/).
`make_trial`, `restore` and `train` need no Ray: they run on any process group (tests and
benchmarks use them directly).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ercstudy.trainables import private_apis, reports
from ercstudy.trainables.checkpoint import CHECKPOINT_TAG
from ercstudy.trainables.checkpoint import save as save_checkpoint
from ercstudy.trainables.checkpoint_writer import CheckpointSchedule, CheckpointWriter
from ercstudy.trainables.config import CONFIG_KEY, TrialConfig
from ercstudy.trainables.data import GlobalBatchStream, build_train_data
from ercstudy.trainables.devices import device_peak_flops, peak_memory_mb, system_metrics
from ercstudy.trainables.engine import build_engine
from ercstudy.trainables.erc import resolve_epsilon
from ercstudy.trainables.evals import build_evaluator
from ercstudy.trainables.lm_eval_adapter import TrialHarness
from ercstudy.trainables.specialization import layer_metric_tensors, to_host
from ercstudy.trainables.step import Trial, Window, coupling, train_step

# Expert parallelism uses torch.distributed.nn's autograd collectives, deprecated in torch 2.13 for
# _functional_collectives, whose all-gather backward is a reduce-scatter that gloo (CPU) lacks.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated", category=FutureWarning)

CRASH_GRACE_S = 10.0


def make_trial(cfg: TrialConfig, *, rank: int, world: int, device: torch.device, data: GlobalBatchStream | None = None) -> Trial:
    """A worker's trial at step 0 on the current process group (Ray Train's, or any other).

    `data`: the training stream; by default the config's (data.build_train_data).
    """
    built = build_engine(cfg, device, rank=rank)
    t = cfg.train
    if data is None:
        data = build_train_data(cfg.data, seq_len=cfg.model.seq_len, seed=t.seed, global_batch=t.global_batch_size,
                                micro_batch=t.micro_batch_size, rank=rank, world=world)
    evaluator = build_evaluator(cfg.eval, cfg.data, seq_len=cfg.model.seq_len, seed=t.seed, rank=rank, world=world, device=device)
    trial = Trial(cfg, built.deepspeed, built.model, data, device, rank, world, built.ep_group, torch.Generator(device=device), evaluator)
    trial.checkpoints = CheckpointSchedule(t, cfg.steps, device=device, world=world)
    system_metrics(device)  # starts the CPU utilisation's interval: the first report's then covers the first window
    if cfg.eval.harness.enabled:
        trial.harness = TrialHarness(cfg, rank=rank, device=device)
    return trial


def restore(trial: Trial, checkpoint_dir: str) -> None:
    """Load a checkpoint of the trial's (collective): weights, optimizer, LR schedule, step and history."""
    _, client_state = trial.engine.load_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
    trial.step, trial.history = client_state[reports.STEP], list(client_state["history"])
    trial.unevaluated = client_state.get("unevaluated")  # saved before its step's evaluations: train() runs them first
    trial.resumed_from = trial.step


# ---------------------------------------------------------------------------------------------
# Reports


def reduce_window(w: Window) -> dict[str, torch.Tensor]:
    """Sum the window over all workers (each saw different tokens)."""
    tensors = {"losses": w.losses, "tokens_per_expert": w.tokens_per_expert, "dropped": w.dropped}
    if w.domain_counts is not None:
        tensors["domain_counts"] = w.domain_counts
    if w.coupling is not None:
        tensors["coupling"] = w.coupling
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors.values():
            dist.all_reduce(t)
    return tensors


def window_metrics(trial: Trial, window: Window) -> dict[str, Any]:
    """Reduce the window across workers and compute every reported metric (collective: all ranks call it)."""
    cfg = trial.cfg
    sums = reduce_window(window)
    elapsed = time.perf_counter() - window.started
    tokens = window.steps * cfg.train.global_batch_size * cfg.model.seq_len
    with torch.no_grad():
        if cfg.moe.kind == "aoe":  # M from AoE's own activations (aoe.py); no router rows
            aoe = sums["coupling"]
            m_clean = aoe[..., :-1] / aoe[..., -1:].clamp_min(1)
            router = None
        else:
            m_clean = coupling(trial.model, cfg, trial.ep_group, generator=None, clean=True).activations
            router = trial.model.router_weights()
        per_layer = layer_metric_tensors(
            router,
            m_clean,
            sums["tokens_per_expert"],
            sums["dropped"] / (window.micro_batches * trial.world),
            sums.get("domain_counts"),
        )
        if cfg.erc.enabled:  # the noise the loss drew its proxies with: eps_mean is the paper's bound, this is what was used
            router = trial.model.router_weights()
            per_layer["eps_used"] = resolve_epsilon(router, cfg.erc.epsilon, scale=cfg.erc.epsilon_scale).mean(-1)
        losses = sums["losses"] / (window.micro_batches * trial.world)
        scalars = dict(zip(("lm", "lb", "z", "erc", "nonfinite"), losses.unbind()), own_norm=window.grad_norm)
        ds_norm = trial.engine.get_global_grad_norm()  # the norm DeepSpeed clipped by (None under ZeRO-0 fp32)
        if torch.is_tensor(ds_norm):
            scalars["ds_norm"] = ds_norm
        host = to_host(per_layer, scalars)  # the report's one device -> host transfer
    spec = {k: v for k, v in host.items() if k not in scalars}
    lm, lb, z, erc, nonfinite = (host[k] for k in ("lm", "lb", "z", "erc", "nonfinite"))
    ds_norm = host.get("ds_norm", ds_norm)
    grad_norm = host["own_norm"] if ds_norm is None or not math.isfinite(float(ds_norm)) else float(ds_norm)
    metrics: dict[str, Any] = {
        "step": trial.step,
        reports.TOTAL_STEPS: cfg.steps,
        "tokens": trial.step * cfg.train.global_batch_size * cfg.model.seq_len,
        "lm_loss": lm,
        "lb_loss": lb,
        "z_loss": z,
        "erc_loss": erc * (cfg.grad_accum if cfg.erc.enabled else 0),  # ERC is computed once per step
        "grad_norm": grad_norm,
        "lr": float(trial.engine.get_lr()[0]),
        "tokens_per_s": tokens / elapsed,
        "peak_memory_mb": peak_memory_mb(trial.device),
        **system_metrics(trial.device),
        **spec,
    }
    peak = device_peak_flops(trial.device)
    if peak:
        metrics["mfu"] = cfg.flops_per_token() * metrics["tokens_per_s"] / (peak * trial.world)
    if trial.step == cfg.steps:
        metrics[reports.COUPLING_MATRIX] = m_clean.float().cpu().tolist()  # [L, n, n], for the trial's heatmaps
    if nonfinite > 0 or not math.isfinite(lm):
        metrics[reports.STOP_REASON] = f"non-finite loss within steps {trial.step - window.steps + 1}..{trial.step} (lm_loss={lm})"
    return metrics


def save_and_report(trial: Trial, metrics: dict[str, Any], *, checkpoint: bool) -> None:
    """ray.train.report on every rank (a barrier); with a DeepSpeed checkpoint every rank writes its shard,
    behind the training step when train.async_checkpoint (checkpoint_writer.py)."""
    if not checkpoint:
        trial.writer.report_metrics(metrics)
        return
    trial.writer.report(metrics, lambda directory: save_checkpoint(directory, trial.engine, trial.cfg, step=trial.step,
                                                             history=trial.history, rank=trial.rank,
                                                             unevaluated=trial.unevaluated))
    if reports.checkpoint_only(metrics):  # the step's evaluations come next: they start once it is in storage
        trial.writer.wait_uploaded()


# ---------------------------------------------------------------------------------------------
# The loop


def train(trial: Trial, report: Callable[..., None]) -> None:
    """Train from trial.step to the last step; `report(trial, metrics, checkpoint=bool)` at every report
    (on every rank: it may be a collective). Stops at the first report with a stop_reason.

    A step that is due both a checkpoint and evaluations saves first, in a report of its own
    (reports.checkpoint_only), then evaluates and reports its metrics: an evaluation that fails (a GPU out
    of memory) loses no training, and a worker restored from that checkpoint runs the evaluations first."""
    cfg = trial.cfg
    if trial.unevaluated is not None:
        metrics, trial.unevaluated = trial.unevaluated, None
        conclude(trial, metrics, report, checkpoint=False)
    window = Window.empty(cfg, trial.device, trial.data.num_domains)
    while trial.step < cfg.steps:
        trial.step += 1
        if cfg.train.crash_at_step == trial.step and cfg.train.crash_in == "step" and trial.rank == 0:
            inject_crash()
        reporting = trial.step % cfg.train.report_every == 0 or trial.step == cfg.steps
        train_step(trial, window, measure_grad_norm=reporting)
        if not reporting:
            continue
        metrics = window_metrics(trial, window)
        stop = reports.STOP_REASON in metrics
        save = not stop and trial.checkpoints.due(trial.step)
        if save and (held_out_due(trial) or harness_due(trial)):
            trial.unevaluated = metrics
            report(trial, {reports.CHECKPOINT_OF_STEP: trial.step}, checkpoint=True)
            trial.unevaluated, save = None, False
            trial.checkpoints.saved()
        conclude(trial, metrics, report, checkpoint=save)
        if stop:
            break
        window = Window.empty(cfg, trial.device, trial.data.num_domains)


def held_out_due(trial: Trial) -> bool:
    every, step = trial.cfg.eval.every, trial.step
    return trial.evaluator is not None and ((every and step % every == 0) or step == trial.cfg.steps)


def harness_due(trial: Trial) -> bool:
    return trial.harness is not None and trial.harness.due(trial.step)


def conclude(trial: Trial, metrics: dict[str, Any], report: Callable[..., None], *, checkpoint: bool) -> None:
    """The step's evaluations (unless it stops the trial), then its report, with its checkpoint if `checkpoint`."""
    if trial.resumed_from is not None:  # the first report after a restore says where it resumed
        metrics[reports.RESUMED_FROM_STEP], trial.resumed_from = trial.resumed_from, None
        # and carries the reports up to that checkpoint: a study driver that died after Ray Train had the
        # checkpoint but before it logged the reports before it logs them now (each step once in MLflow)
        metrics[reports.RESTORED_HISTORY] = list(trial.history)
    if reports.STOP_REASON not in metrics:
        if trial.cfg.train.crash_at_step == trial.step and trial.cfg.train.crash_in == "eval" and trial.rank == 0:
            inject_crash()
        if held_out_due(trial):
            metrics.update(trial.evaluator(trial.model))  # collective: every rank evaluates its share
        if harness_due(trial):
            metrics.update(trial.harness(trial.model, trial.step))  # lm-eval tasks; a failure is the evaluation's only
    trial.history.append({k: v for k, v in metrics.items() if k not in (reports.HARNESS_RESULTS, reports.RESTORED_HISTORY)})  # checkpoints carry it
    report(trial, metrics, checkpoint=checkpoint)
    if checkpoint:
        trial.checkpoints.saved()


# ---------------------------------------------------------------------------------------------
# The Ray Train worker


def inject_crash() -> None:
    """Fault injection (tests): kill this worker process, once per run.

    A marker in the run's storage makes the restarted group train through the same step. The
    pause first lets Ray Train's controller collect the reports already made (it polls the
    workers), as it would before most real crashes; a report not yet collected is simply lost
    and the run resumes from the checkpoint before it.
    """
    import ray.train

    marker = os.path.join(ray.train.get_context().get_storage().experiment_fs_path, ".crash_injected")
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    time.sleep(CRASH_GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def setup_trial(cfg: TrialConfig) -> Trial:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.resources.gpus_per_worker > 0 else torch.device("cpu")
    trial = make_trial(cfg, rank=rank, world=world, device=device)
    trial.writer = CheckpointWriter(trial.engine, asynchronous=cfg.train.async_checkpoint)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            restore(trial, ckpt_dir)
    if rank == 0:  # the worker's log (the driver prints progress from the reports)
        print(f"{world} worker(s) on {device.type}: " + (f"resumed at step {trial.step}" if trial.step else "training from step 0"), flush=True)
    return trial


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The Ray Train worker: train one trial; rank 0 returns the metric history."""
    cfg = config[CONFIG_KEY]
    if not isinstance(cfg, TrialConfig):
        raise TypeError(f"train_loop_config[{CONFIG_KEY!r}] must be a TrialConfig, got {type(cfg).__name__}")
    report_logger = private_apis.ray_train_report_logger()
    if report_logger is not None:
        report_logger.setLevel(logging.WARNING)  # Ray 2.60 logs every report, all metrics included, at INFO
    trial = setup_trial(cfg)
    if trial.step >= cfg.steps and trial.history and trial.unevaluated is None:
        # resumed after the end (the driver died before it saw the last report): say the final result again
        save_and_report(trial, {**trial.history[-1], reports.RESUMED_FROM_STEP: trial.step, reports.RESTORED_HISTORY: list(trial.history)},
                        checkpoint=False)
    train(trial, save_and_report)
    return trial.history if trial.rank == 0 else []
