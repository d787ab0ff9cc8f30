"""One trial: the Ray Train worker function (DeepSpeed engine, training step, reports,
checkpoints, resume) and `run_trial`, the driver that runs it with a TorchTrainer.

Layers by role, as in Ray's Train+Tune examples: `train_loop_per_worker` (runs on every
worker) -> `run_trial` (one TorchTrainer per trial) -> the study driver (platform/).
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoint import CHECKPOINT_TAG
from .checkpoint import save as save_checkpoint
from .config import TrialConfig
from .data import build_train_data, check_data, train_dataset
from .erc import coupling_activations, erc_from_activations, make_proxies, resolve_epsilon
from .evals import build_evaluator
from .model import MoELM
from .specialization import domain_expert_counts, layer_metrics

# Expert parallelism uses torch.distributed.nn's autograd collectives, deprecated in torch 2.13 for
# _functional_collectives, whose all-gather backward is a reduce-scatter that gloo (CPU) lacks.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated", category=FutureWarning)

CRASH_GRACE_S = 10.0
# bf16 dense peak per GPU, for MFU (FLOP/s). Unknown devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ---------------------------------------------------------------------------------------------
# DeepSpeed


def deepspeed_config(cfg: TrialConfig, *, bf16: bool) -> dict[str, Any]:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bf16},
        # torch_adam: the torch AdamW, not DeepSpeed's JIT-built CPU/CUDA Adam (50 s of compilation on CPU)
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8, "weight_decay": t.weight_decay, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": cfg.steps,
                # DeepSpeed refuses 0 warm-up steps: 0 means one (its first step then runs at lr 0)
                "warmup_num_steps": max(1, min(t.warmup_steps, cfg.steps)),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": t.min_lr_ratio,
            },
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms); DeepSpeed splits the expert parameters out."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


# ---------------------------------------------------------------------------------------------
# ERC under expert parallelism


def gather_columns(m_local: Tensor, group: Any) -> Tensor:
    """Concatenate each expert-parallel rank's columns of M [..., n, n_local] -> [..., n, n].

    Autograd-aware all-gather: every rank computes the same loss from the same M, and its
    backward sums the ranks' gradients; DeepSpeed then divides expert gradients by the full
    data-parallel size, which makes the expert and router gradients exact.
    """
    if group is None or dist.get_world_size(group=group) == 1:
        return m_local
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(m_local, group=group), dim=-1)


def erc_activations(model: MoELM, cfg: TrialConfig, generator: torch.Generator | None, ep_group: Any, *, clean: bool = False) -> Tensor:
    """M [L, n, n] of all MoE layers: noisy proxies for the loss, clean router rows (eps = 0) for metrics."""
    router = model.router_weights()  # [L, n, d], the same on every rank
    if clean:
        proxies = router.float()
    else:
        router_in = router if cfg.erc.router_grad else router.detach()
        proxies = make_proxies(router_in, resolve_epsilon(router, cfg.erc.epsilon), generator=generator)
    return gather_columns(coupling_activations(proxies, model.gate_weights()), ep_group)


# ---------------------------------------------------------------------------------------------
# Metrics of a report window


@dataclass
class Window:
    """Sums over the steps since the last report, kept on the device (no host sync per step)."""

    losses: Tensor  # [5]: lm, lb, z, erc, non-finite count
    grad_norm: Tensor  # [] global gradient norm (before clipping) of the window's last step
    tokens_per_expert: Tensor  # [L, n]
    dropped: Tensor  # [L]
    domain_counts: Tensor | None  # [L, domains, n]
    micro_batches: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def empty(cls, cfg: TrialConfig, device: torch.device, num_domains: int) -> Window:
        L, n = cfg.num_moe_layers, cfg.moe.num_experts
        domains = torch.zeros(L, num_domains, n, device=device) if num_domains else None
        zeros = partial(torch.zeros, device=device)
        return cls(zeros(5), zeros(()).fill_(float("nan")), zeros(L, n), zeros(L), domains)


def reduce_window(w: Window) -> dict[str, Tensor]:
    """Sum the window over all workers (each saw different tokens)."""
    tensors = {"losses": w.losses, "tokens_per_expert": w.tokens_per_expert, "dropped": w.dropped}
    if w.domain_counts is not None:
        tensors["domain_counts"] = w.domain_counts
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors.values():
            dist.all_reduce(t)
    return tensors


# ---------------------------------------------------------------------------------------------
# The worker


@dataclass
class Trial:
    """Everything a worker holds while it trains."""

    cfg: TrialConfig
    engine: Any
    model: MoELM
    data: Any
    device: torch.device
    rank: int
    world: int
    ep_group: Any
    erc_generator: torch.Generator
    evaluator: Any = None
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def global_grad_norm(trial: Trial) -> Tensor:
    """L2 norm of all gradients after DeepSpeed's all-reduce, before clipping (expert shards summed over EP)."""
    from deepspeed.moe.utils import is_moe_param

    dense, expert = torch.zeros((), device=trial.device), torch.zeros((), device=trial.device)
    for p in trial.model.parameters():
        if p.grad is not None:
            sq = p.grad.detach().float().square().sum()
            if is_moe_param(p):
                expert += sq
            else:
                dense += sq
    if trial.ep_group is not None:
        dist.all_reduce(expert, group=trial.ep_group)
    return (dense + expert).sqrt()


def train_step(trial: Trial, window: Window, *, measure_grad_norm: bool) -> None:
    """One optimizer step: micro-batches, forward, LM + LB + z (+ ERC once), backward, step, metrics."""
    cfg, engine, model = trial.cfg, trial.engine, trial.model
    accum = cfg.grad_accum
    for micro in range(accum):
        batch = trial.data.micro_batch(trial.step, micro)
        tokens = batch.tokens.to(trial.device)
        out = engine(tokens[:, :-1], tokens[:, 1:])
        lb, z = out.aux.lb_loss.mean(), out.aux.z_loss.mean()
        loss = out.lm_loss + cfg.moe.lb_weight * lb + cfg.moe.z_weight * z
        erc = torch.zeros((), device=trial.device)
        if cfg.erc.enabled and micro == accum - 1:
            # Once per optimizer step: the ERC gradient depends on parameters only, which do not change
            # inside an accumulation window. DeepSpeed divides each micro-batch loss by `accum`: undo it.
            trial.erc_generator.manual_seed(cfg.train.seed * 1_000_003 + trial.step)  # same noise on every rank, and on resume
            per_layer = erc_from_activations(erc_activations(model, cfg, trial.erc_generator, trial.ep_group), cfg.erc.alpha)
            erc = per_layer.mean() if cfg.erc.layer_reduction == "mean" else per_layer.sum()
            loss = loss + accum * cfg.erc.weight * erc
        if cfg.train.nan_at_step == trial.step:
            loss = loss * float("nan")
        engine.backward(loss)
        if measure_grad_norm and micro == accum - 1:
            window.grad_norm = global_grad_norm(trial)  # ZeRO keeps no .grad: then DeepSpeed's own norm below
        engine.step()
        with torch.no_grad():
            window.losses += torch.stack([out.lm_loss, lb, z, erc, (~torch.isfinite(loss)).float()]).detach()
            window.tokens_per_expert += out.aux.tokens_per_expert
            window.dropped += out.aux.dropped_fraction
            if window.domain_counts is not None:
                window.domain_counts += domain_expert_counts(
                    out.aux.experts, batch.domains.to(trial.device), trial.data.num_domains, cfg.moe.num_experts
                )
            window.micro_batches += 1
    window.steps += 1


def window_metrics(trial: Trial, window: Window) -> dict[str, Any]:
    """Reduce the window across workers and compute every reported metric (collective: all ranks call it)."""
    cfg = trial.cfg
    sums = reduce_window(window)
    lm, lb, z, erc, nonfinite = (sums["losses"] / (window.micro_batches * trial.world)).tolist()
    elapsed = time.perf_counter() - window.started
    tokens = window.steps * cfg.train.global_batch_size * cfg.model.seq_len
    with torch.no_grad():
        m_clean = erc_activations(trial.model, cfg, None, trial.ep_group, clean=True)
        spec = layer_metrics(
            trial.model.router_weights(),
            m_clean,
            sums["tokens_per_expert"],
            sums["dropped"] / (window.micro_batches * trial.world),
            sums.get("domain_counts"),
        )
    ds_norm = trial.engine.get_global_grad_norm()
    grad_norm = window.grad_norm.item() if ds_norm is None or not math.isfinite(float(ds_norm)) else float(ds_norm)
    metrics: dict[str, Any] = {
        "step": trial.step,
        "total_steps": cfg.steps,
        "tokens": trial.step * cfg.train.global_batch_size * cfg.model.seq_len,
        "lm_loss": lm,
        "lb_loss": lb,
        "z_loss": z,
        "erc_loss": erc * (cfg.grad_accum if cfg.erc.enabled else 0),  # ERC is computed once per step
        "grad_norm": grad_norm,
        "lr": float(trial.engine.get_lr()[0]),
        "tokens_per_s": tokens / elapsed,
        **spec,
    }
    peak = next((v for k, v in PEAK_FLOPS.items() if trial.device.type == "cuda" and k in torch.cuda.get_device_name(trial.device)), None)
    if peak:
        metrics["mfu"] = cfg.flops_per_token() * metrics["tokens_per_s"] / (peak * trial.world)
    if trial.step == cfg.steps:
        metrics["coupling_matrix"] = m_clean.float().cpu().tolist()  # [L, n, n], for the trial's heatmaps
    if nonfinite > 0 or not math.isfinite(lm):
        metrics["stop_reason"] = f"non-finite loss within steps {trial.step - window.steps + 1}..{trial.step} (lm_loss={lm})"
    return metrics


def save_and_report(trial: Trial, metrics: dict[str, Any], *, checkpoint: bool) -> None:
    """ray.train.report on every rank (a barrier); with a DeepSpeed checkpoint every rank writes its shard."""
    import ray.train

    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, trial.engine, trial.cfg, step=trial.step, history=trial.history, rank=trial.rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def progress_line(cfg: TrialConfig, m: dict[str, Any]) -> str:
    parts = [
        f"step {m['step']:>{len(str(cfg.steps))}}/{cfg.steps}",
        f"lm {m['lm_loss']:.4f}",
        f"lb {m['lb_loss']:.4f}",
        f"erc {m['erc_loss']:.2e}",
        f"alpha* {m['alpha_star']:.2f}",
        f"eps {m['eps_mean']:.3f}",
        f"cos {m['router_cos']:.3f}",
    ]
    if "domain_nmi" in m:
        parts.append(f"nmi {m['domain_nmi']:.3f}")
    if "eval/loss" in m:
        parts.append(f"eval {m['eval/loss']:.4f}")
    if "eval/mc_domain/acc" in m:
        parts.append(f"mc {m['eval/mc_domain/acc']:.2f}")
    parts += [f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:,.0f} tok/s"]
    return " | ".join(parts)


def skip_cpu_shm_comm_build() -> None:
    """Let DeepSpeed on CPU use plain gloo collectives instead of JIT-compiling its shared-memory op.

    That op takes from minutes to a quarter of an hour to compile on a 2-core machine, on the
    first run of every fresh machine, and only speeds up CPU all-reduces between workers of one
    node. DeepSpeed keeps its op-compatibility table as an editable module-level dict (see
    deepspeed/ops/__init__.py); marking the op incompatible makes deepspeed.comm skip it.
    Set ERCSTUDY_DS_SHM_COMM=1 to build and use it anyway.
    """
    if os.environ.get("ERCSTUDY_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        ops = deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})
        ops[builder.NAME] = False


def build_engine(cfg: TrialConfig, device: torch.device, *, rank: int) -> tuple[Any, MoELM, Any]:
    """The model and its DeepSpeed engine on the current process group: (engine, model, expert-parallel group)."""
    import deepspeed

    if device.type == "cpu":
        skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")  # reuses Ray's process group
    ep = cfg.resources.ep_size
    # DeepSpeed's expert-parallel groups put consecutive ranks together: rank r holds expert slice r % ep.
    model = MoELM(cfg.model, cfg.moe, seed=cfg.train.seed, ep_size=ep, ep_rank=rank % ep)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=deepspeed_config(cfg, bf16=bf16)
    )
    ep_group = None
    if ep > 1:
        from deepspeed.utils import groups

        ep_group = groups._get_expert_parallel_group(f"ep_size_{ep}")
    return engine, model, ep_group


def make_trial(cfg: TrialConfig, *, rank: int, world: int, device: torch.device, data: Any = None) -> Trial:
    """A worker's trial at step 0 on the current process group (Ray Train's, or any other).

    `data`: the training stream; by default the config's (Parquet shards come from the Ray
    Train dataset shard, so outside Ray Train pass a data.ParquetStream over any Ray Dataset).
    """
    engine, model, ep_group = build_engine(cfg, device, rank=rank)
    data = data if data is not None else build_train_data(cfg, rank=rank, world=world)
    return Trial(cfg, engine, model, data, device, rank, world, ep_group, torch.Generator(device=device),
                 build_evaluator(cfg, rank=rank, world=world, device=device))


def restore(trial: Trial, checkpoint_dir: str) -> None:
    """Load a checkpoint of the trial's (collective): weights, optimizer, LR schedule, step and history."""
    _, client_state = trial.engine.load_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
    trial.step, trial.history = client_state["step"], list(client_state["history"])


def setup_trial(cfg: TrialConfig) -> Trial:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.resources.gpus_per_worker > 0 else torch.device("cpu")
    trial = make_trial(cfg, rank=rank, world=world, device=device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            restore(trial, ckpt_dir)
        if rank == 0:
            print(f"resumed from checkpoint at step {trial.step}", flush=True)
    elif rank == 0:
        print(f"{world} worker(s) ready on {device.type}: training from step 0", flush=True)
    return trial


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


def quiet_report_log() -> None:
    """Ray 2.60's worker logs every report, all metrics included, at INFO under a logger named by
    its file path, which RunConfig's LoggingConfig(log_level) does not reach (it filters `ray.train.*`)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its logs stay as they are
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The Ray Train worker: train one trial; rank 0 returns the metric history."""
    cfg = TrialConfig.from_dict(config)
    quiet_report_log()
    trial = setup_trial(cfg)
    if trial.step >= cfg.steps and trial.history:
        # resumed after the end (the driver died before it saw the last report): say the final result again
        save_and_report(trial, trial.history[-1], checkpoint=False)
    train(trial, save_and_report)
    return trial.history if trial.rank == 0 else []


def train(trial: Trial, report: Callable[..., None]) -> None:
    """Train from trial.step to the last step; `report(trial, metrics, checkpoint=bool)` at every report
    (on every rank: it may be a collective). Stops at the first report with a stop_reason."""
    cfg = trial.cfg
    window = Window.empty(cfg, trial.device, trial.data.num_domains)
    while trial.step < cfg.steps:
        trial.step += 1
        if cfg.train.crash_at_step == trial.step and trial.rank == 0:
            inject_crash()
        reporting = trial.step % cfg.train.report_every == 0 or trial.step == cfg.steps
        train_step(trial, window, measure_grad_norm=reporting)
        if not reporting:
            continue
        metrics = window_metrics(trial, window)
        stop = "stop_reason" in metrics
        every = cfg.eval.every
        if trial.evaluator is not None and not stop and ((every and trial.step % every == 0) or trial.step == cfg.steps):
            metrics.update(trial.evaluator(trial.model))  # collective: every rank evaluates its share
        trial.history.append(metrics)
        if trial.rank == 0:
            print(progress_line(cfg, metrics) if not stop else f"stopping: {metrics['stop_reason']}", flush=True)
        report(trial, metrics, checkpoint=not stop and (trial.step % cfg.train.checkpoint_every == 0 or trial.step == cfg.steps))
        if stop:
            break
        window = Window.empty(cfg, trial.device, trial.data.num_domains)


# ---------------------------------------------------------------------------------------------
# The driver


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
    """Run one trial as a TorchTrainer on the connected (or a new local) Ray; never raises for a failed trial."""
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        from ercstudy.platform.ray_runtime import ensure_ray

        ensure_ray()
    check_data(cfg)
    res = cfg.resources
    use_gpu = res.gpus_per_worker > 0
    dataset = train_dataset(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        datasets={"train": dataset} if dataset is not None else None,
        # Every worker reads the whole dataset in order and takes its rows (see data.ParquetStream).
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
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
            # DeepSpeed picks its accelerator once, at import: CPU workers must say so; GPU workers must not.
            # RAY_TRAIN_ENABLE_PRINT_PATCH=0: rank 0's progress lines once, not twice (stdout + Train's logger).
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **({} if use_gpu else {"DS_ACCELERATOR": "cpu"})}},
            callbacks=callbacks or [],
            # Ray Train's INFO lines repeat every metric of every report; its warnings stay. Progress is ours.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    print(f"{name}: starting {res.num_workers} worker(s) (seconds on a laptop, minutes on a busy 2-core machine)", flush=True)
    try:
        result = trainer.fit()
    except Exception as err:  # TrainingFailedError: workers failed more than max_failures times
        return TrialResult([], None, os.path.join(storage_path, name), f"{type(err).__name__}: {err}".splitlines()[0], None)
    history = list(result.return_value or [])
    stop_reason = history[-1].get("stop_reason") if history else None
    error = f"{type(result.error).__name__}: {result.error}".splitlines()[0] if result.error else None
    return TrialResult(history, result.checkpoint.path if result.checkpoint else None, result.path, error, stop_reason)
