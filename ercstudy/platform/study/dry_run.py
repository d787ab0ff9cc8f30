"""`ercstudy dry-run`: what a study would train, computed from its file alone, before any GPU time.

One row per distinct model shape among the representative points of the space: parameters,
active parameters, FLOPs per token, tokens, steps and a memory estimate per worker; then the
search, the objective and how many trials this machine runs at once; then the study's trial count
(points x seeds, plus the fixed arms at the same seeds) and its GPU-hours (`budget_lines`).
"""

from __future__ import annotations

from ercstudy.platform.study.plan import StudyPlan
from ercstudy.platform.study.spec import corner_points
from ercstudy.platform.study.tables import text_table
from ercstudy.trainables.config import TrialConfig

# GPU-hours at an assumed throughput: H100/H200 SXM dense bf16 peak (trainables/devices.py) at a typical MoE MFU
ASSUMED_PEAK_TFLOPS = 989.0
ASSUMED_MFU = 0.3

# fields of the trial config that change the model's shape (the dry run groups points by them)
SHAPE_FIELDS = ("model.", "moe.num_experts", "moe.top_k", "moe.expert_dim", "moe.moe_every")


def model_shapes(plan: StudyPlan) -> dict[tuple, tuple[TrialConfig, int]]:
    """Distinct model shapes among the representative points: shape key -> (a config, how many points)."""
    shapes: dict[tuple, tuple[TrialConfig, int]] = {}
    for point in plan.corners:
        cfg = plan.trial_config(point)
        key = tuple(sorted((p, v) for p, v in point.items() if p.startswith(SHAPE_FIELDS) or p == "train.tokens"))
        prev = shapes.get(key)
        shapes[key] = (prev[0] if prev else cfg, (prev[1] if prev else 0) + 1)
    return shapes


def dry_run_lines(plan: StudyPlan, *, cpus: int, gpus: int) -> list[str]:
    """What `ercstudy dry-run` prints: one row per distinct model shape in the space."""
    study = plan.study
    gpu = study.base_config.resources.gpus_per_worker > 0
    columns = ("shape", "params", "active", "MFLOP/tok", "tokens", "steps", "mem/worker", "points")
    rows = []
    for key, (cfg, count) in model_shapes(plan).items():
        tokens = cfg.trained_tokens
        rows.append({"shape": ", ".join(f"{p.split('.')[-1]}={v}" for p, v in key) or "base",
                     "params": f"{cfg.num_params() / 1e6:.2f}M", "active": f"{cfg.num_active_params() / 1e6:.2f}M",
                     "MFLOP/tok": f"{cfg.flops_per_token() / 1e6:.1f}", "tokens": f"{tokens:,}", "steps": cfg.steps,
                     "mem/worker": f"{cfg.memory_per_worker(gpu=gpu) / 1e9:.2f} GB", "points": count})
    lines = text_table(rows, columns, left=("shape",))
    res = study.base_config.resources
    need_cpu, need_gpu = res.num_workers * res.cpus_per_worker, res.num_workers * res.gpus_per_worker
    fit = int(cpus // need_cpu if not need_gpu else min(cpus // need_cpu, gpus // need_gpu))
    cap = min(fit, study.search.max_concurrent or fit, plan.num_trials)
    lines += [
        "",
        f"search: {study.search.sampler}, {plan.points} point(s) over {', '.join(study.search.params)}"
        + (f"; constraints: {'; '.join(c.text for c in study.constraints)}" if study.constraints else ""),
        f"objective: {', '.join(f'{o.metric} ({o.mode})' for o in study.objectives)}; scheduler: {study.scheduler.type}"
        + (f" (grace {study.scheduler.grace_period} {study.scheduler.time_attr}s, reduction {study.scheduler.reduction_factor:g})"
           if study.scheduler.type == "asha" else ""),
        f"per trial: {res.num_workers} worker(s) x ({res.cpus_per_worker} CPU, {res.gpus_per_worker} GPU), ep_size {res.ep_size}; "
        f"this machine ({cpus} CPUs, {gpus} GPUs) runs {cap} trial(s) at once"
        + ("" if cap else " -- none: it lacks the resources of one trial; run on a cluster (--address)"),
        *budget_lines(plan),
    ]
    if gpu and any(plan.trial_config(c).moe.backend == "grouped" for c in plan.corners):
        lines.append("grouped MoE on GPUs: torch's fused grouped GEMM needs compute capability 9.x/10.x (H100, H200, B200); "
                     "on an A100, L40S or L4 it loops over the experts with a host sync per MoE layer (docs/gpu-performance.md)")
    return lines


def trial_flops(cfg: TrialConfig) -> float:
    """Training FLOPs of one trial: FLOPs per token x the tokens its steps train on (evals not counted)."""
    return cfg.flops_per_token() * cfg.trained_tokens


def budget_lines(plan: StudyPlan, *, peak_tflops: float = ASSUMED_PEAK_TFLOPS, mfu: float = ASSUMED_MFU) -> list[str]:
    """The study's trial count and compute: every point at every seed and every fixed arm at the same seeds.

    Grid studies sum their actual points; other samplers take the mean trial of the space's corners
    times the number of points (an estimate: the sampler picks the points).
    """
    study, s = plan.study, plan.study.search
    points, arms = plan.points, plan.arms
    if s.sampler == "grid":
        sampled = sum(trial_flops(plan.trial_config(p)) for p in corner_points(study, limit=10**6, full=True)[:points])
        how = "the grid's points"
    else:
        corners = [trial_flops(plan.trial_config(p)) for p in plan.corners]
        sampled = points * sum(corners) / len(corners)
        how = "estimated: points x the mean trial of the space's corners"
    arm_flops = sum(trial_flops(plan.trial_config(p)) for _, p in arms)
    flops = (sampled + arm_flops) * len(plan.seeds)
    res = study.base_config.resources
    gpus = res.num_workers * res.gpus_per_worker
    lines = [
        plan.count_line(),
        f"training compute: {flops:.3g} FLOPs ({how})",
    ]
    if gpus:
        hours = flops / (peak_tflops * 1e12 * mfu) / 3600  # each GPU of a trial does its share of the FLOPs
        lines.append(f"GPU-hours: {hours:,.1f} at {peak_tflops:g} TFLOP/s per GPU x MFU {mfu:g} (assumed; H100/H200 bf16 dense peak), "
                     f"{gpus} GPU(s) per trial")
    else:
        lines.append("GPU-hours: none (CPU trials)")
    return lines
