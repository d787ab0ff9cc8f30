"""End-to-end training step under the DeepSpeed engine on one device, ERC on vs off, and the cost of a checkpoint.

    python benchmarks/train_step.py                # GPU: the paper's 3B layer shape (d 1536, n 64, top-8, D 768), 6 layers
    python benchmarks/train_step.py --layers 12    # the target's 12 layers, if they fit
    python benchmarks/train_step.py --tiny         # CPU smoke run (tests)

The step is ercstudy's own (trainables/step.py: micro-batches, LM + LB + z, ERC once per
optimizer step, backward, DeepSpeed step), on random tokens, 64k tokens per optimizer step.

One engine is built (never two alive at once: each holds the fp32 masters and Adam moments). Two
Trials share it, their configs differing only in erc.enabled, and their steps are timed paired and
interleaved (off, on, off, on, ...): the ERC overhead is the median of the per-pair ratios on / off,
with their 10th and 90th percentiles, so that drift falls on both arms alike. After timing, every
loss of both arms must be finite (else the script stops).

MFU = FLOPs per token (6 x active params + causal attention, from the config) x tokens/s / the dense
bf16 peak of the device (trainables/devices.py: one table, with its sources); none for a device the
table does not know.

A checkpoint save (trainables/checkpoint.save: DeepSpeed's collective save plus the config) is timed
twice into a temporary directory: synchronously (DeepSpeed's TorchCheckpointEngine: the step is held
for the whole write) and as training saves (checkpoint_writer.HostSnapshotEngine: the step is held
for the copy into host memory, torch.save runs on a background thread, whose time is reported too).
A torch.profiler summary of one step per arm (top operators by self time) says where the time goes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parser, report, resolve, spread, sync, time_paired, verify_that  # noqa: E402


class RandomTokens:
    """A data stream of uniformly random tokens (the step's cost does not depend on the data)."""

    num_domains = 0

    def __init__(self, vocab: int, seq_len: int, micro_batch: int, device):
        self.shape, self.vocab = (micro_batch, seq_len + 1), vocab

    def micro_batch(self, step: int, micro: int):
        from ercstudy.trainables.data import Batch

        g = torch.Generator().manual_seed(step * 1000 + micro)
        return Batch(torch.randint(0, self.vocab, self.shape, generator=g), torch.zeros(self.shape[0], dtype=torch.long))


def trial_config(args, erc: bool, dtype):
    from ercstudy.trainables.config import TrialConfig

    if args.tiny:
        model = {"vocab_size": 128, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32}
        moe = {"num_experts": 8, "top_k": 2, "expert_dim": 16}
        train = {"global_batch_size": 8, "micro_batch_size": 4}
    else:
        model = {"vocab_size": 32768, "d_model": 1536, "n_layers": args.layers, "n_heads": 12, "seq_len": 2048}
        moe = {"num_experts": 64, "top_k": 8, "expert_dim": 768}
        train = {"global_batch_size": 32, "micro_batch_size": args.micro_batch}  # 64k tokens per optimizer step
    steps = 2 * (args.warmup + args.repeats + 1) + 2  # both arms step one engine, plus a profiled step each
    train.update(tokens=steps * train["global_batch_size"] * model["seq_len"], precision="bf16" if dtype == torch.bfloat16 else "fp32",
                 warmup_steps=0, report_every=1, checkpoint_every=10**6)
    return TrialConfig.from_dict({"model": model, "moe": moe, "erc": {"enabled": erc}, "train": train,
                                  "data": {"num_domains": 1, "tokens_per_domain": 1, "shared_tokens": 0},
                                  "eval": {"sequences": 0, "mc_items": 0}})


def init_single_process(device) -> None:
    from ercstudy.netutil import free_port

    if torch.distributed.is_initialized():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def profile_summary(step, device, rows=12) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def checkpoint_cost(trial, device, directory: str) -> dict[str, float]:
    """How long one save holds the step: synchronous (DeepSpeed's torch engine) and asynchronous (the host
    snapshot training uses), and how long the asynchronous save's background writes take after it returns."""
    import shutil
    import tempfile
    import time

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from ercstudy.trainables.checkpoint import save
    from ercstudy.trainables.checkpoint_writer import HostSnapshotEngine, wait_written

    engine = trial.engine
    original = engine.checkpoint_engine
    config = getattr(engine, "_config", None)
    cost = {}
    try:
        for mode, checkpoint_engine in (("sync", TorchCheckpointEngine(config)), ("async", HostSnapshotEngine(config))):
            target = tempfile.mkdtemp(prefix=f"ercstudy-bench-{mode}-", dir=directory)
            engine.checkpoint_engine = checkpoint_engine
            sync(device)
            started = time.perf_counter()
            save(target, engine, trial.cfg, step=trial.step, history=[], rank=0)
            sync(device)
            returned = time.perf_counter()
            cost[f"save_{mode}_held_s"] = returned - started
            if mode == "async":
                wait_written(checkpoint_engine.take_pending())
                cost["save_async_write_s"] = time.perf_counter() - returned
            cost[f"checkpoint_{mode}_mb"] = sum(f.stat().st_size for f in Path(target).rglob("*") if f.is_file()) / 2**20
            shutil.rmtree(target)  # a 3B-shape checkpoint is tens of GiB: one on disk at a time
    finally:
        engine.checkpoint_engine = original
    return cost


def finite_loss_checks(windows) -> list[dict]:
    """Every loss of every timed step finite, per arm ({erc enabled: Window}); stops the script otherwise."""
    checks = []
    for erc, window in windows.items():
        losses = window.losses.cpu()  # sums of lm, lb, z, erc; the count of non-finite micro-batch losses
        checks.append(verify_that(f"erc {'on' if erc else 'off'}: every loss finite after {window.steps} steps",
                                  bool(torch.isfinite(losses).all()) and losses[4].item() == 0,
                                  steps=window.steps, mean_lm_loss=losses[0].item() / max(window.micro_batches, 1)))
    return checks


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-checkpoint", action="store_true", help="skip timing a checkpoint save")
    p.add_argument("--checkpoint-dir", default=None, help="where the timed checkpoints are written (default: the system temp dir)")
    args = p.parse_args(argv)
    device, dtype = resolve(args)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_single_process(device)
    from ercstudy.trainables.devices import device_peak_flops
    from ercstudy.trainables.engine import build_engine
    from ercstudy.trainables.step import Trial, Window, train_step

    cfg_on = trial_config(args, True, dtype)
    arms = {False: replace(cfg_on, erc=replace(cfg_on.erc, enabled=False)), True: cfg_on}
    built = build_engine(cfg_on, device, rank=0)  # erc.enabled does not enter the engine: one engine serves both arms
    data = RandomTokens(cfg_on.model.vocab_size, cfg_on.model.seq_len, cfg_on.train.micro_batch_size, device)
    trials = {erc: Trial(cfg, built.deepspeed, built.model, data, device, 0, 1, built.ep_group, torch.Generator(device=device))
              for erc, cfg in arms.items()}
    windows = {erc: Window.empty(cfg, device, 0) for erc, cfg in arms.items()}

    def stepper(erc: bool):
        def step():
            trial = trials[erc]
            trial.step += 1
            train_step(trial, windows[erc], measure_grad_norm=False)
        return step

    steps = {erc: stepper(erc) for erc in arms}
    times, pairs = time_paired({f"erc_{'on' if erc else 'off'}": steps[erc] for erc in arms}, device,
                               warmup=args.warmup, repeats=args.repeats)
    checks = finite_loss_checks(windows)
    tokens = cfg_on.train.global_batch_size * cfg_on.model.seq_len
    peak = device_peak_flops(device)
    rows = []
    for erc, cfg in arms.items():
        t = times[f"erc_{'on' if erc else 'off'}"]
        tok_s = tokens / (t["median_ms"] / 1e3)
        rows.append({"erc": erc, "active_params_m": cfg.num_active_params() / 1e6, "total_params_m": cfg.num_params() / 1e6,
                     "tokens_per_step": tokens, **t, "tokens_per_s": tok_s,
                     "mfu": cfg.flops_per_token() * tok_s / peak if peak else None})
    overhead = spread([pair["erc_on"] / pair["erc_off"] - 1 for pair in pairs], unit="")
    rows[1].update(erc_overhead=overhead["median"], erc_overhead_p10=overhead["p10"], erc_overhead_p90=overhead["p90"])
    profiles = {} if args.no_profile else {name: profile_summary(steps[erc], device) for erc, name in ((False, "erc_off"), (True, "erc_on"))}
    if not args.no_checkpoint:
        rows[0].update(checkpoint_cost(trials[False], device, args.checkpoint_dir))
    for name, table in profiles.items():
        print(f"\n--- profile, {name} ---\n{table}")
    return report("train_step", args, device, rows, COLUMNS, checks=checks)


COLUMNS = ["erc", "active_params_m", "total_params_m", "tokens_per_step", "median_ms", "p10_ms", "p90_ms", "tokens_per_s", "mfu",
           "erc_overhead", "erc_overhead_p10", "erc_overhead_p90", "save_sync_held_s", "save_async_held_s", "save_async_write_s",
           "checkpoint_sync_mb", "checkpoint_async_mb"]


if __name__ == "__main__":
    main()
