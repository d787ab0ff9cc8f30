"""End-to-end training step under the DeepSpeed engine on one device, ERC on and off: tokens/s, MFU, profile.

    python benchmarks/train_step.py                # GPU: the paper's 3B layer shape (d 1536, n 64, top-8, D 768), 6 layers
    python benchmarks/train_step.py --layers 8     # as many layers as fit
    python benchmarks/train_step.py --tiny         # CPU smoke run (tests)

The step is ercstudy's own (trainables/step.py: micro-batches, LM + LB + z, ERC once per
optimizer step, backward, DeepSpeed step), on random tokens, 64k tokens per optimizer step.
MFU = FLOPs per token (6 x active params + attention, from the config) x tokens/s / peak bf16
FLOP/s of the device (trainables/devices.py: one table, with its sources). A torch.profiler summary of one step
(top operators by self time) says where the time goes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parser, report, resolve, time_ms  # noqa: E402


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
    steps = args.warmup + args.repeats + 2
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


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args(argv)
    device, dtype = resolve(args)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_single_process(device)
    from ercstudy.trainables.devices import device_peak_flops
    from ercstudy.trainables.engine import build_engine
    from ercstudy.trainables.step import Trial, Window, train_step

    rows, profiles = [], {}
    for erc in (False, True):
        cfg = trial_config(args, erc, dtype)
        built = build_engine(cfg, device, rank=0)
        trial = Trial(cfg, built.engine, built.model,
                      RandomTokens(cfg.model.vocab_size, cfg.model.seq_len, cfg.train.micro_batch_size, device),
                      device, 0, 1, built.ep_group, torch.Generator(device=device))
        window = Window.empty(cfg, device, 0)

        def step(trial=trial, window=window):
            trial.step += 1
            train_step(trial, window, measure_grad_norm=False)

        t = time_ms(step, device, warmup=args.warmup, repeats=args.repeats)
        tokens = cfg.train.global_batch_size * cfg.model.seq_len
        tok_s = tokens / (t["median_ms"] / 1e3)
        peak = device_peak_flops(device)
        rows.append({"erc": erc, "active_params_m": cfg.num_active_params() / 1e6, "total_params_m": cfg.num_params() / 1e6,
                     "tokens_per_step": tokens, **t, "tokens_per_s": tok_s,
                     "mfu": cfg.flops_per_token() * tok_s / peak if peak else None})
        if not args.no_profile:
            profiles[f"erc_{'on' if erc else 'off'}"] = profile_summary(step, device)
        del trial, built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows[1]["erc_overhead"] = rows[1]["median_ms"] / rows[0]["median_ms"] - 1
    for name, table in profiles.items():
        print(f"\n--- profile, {name} ---\n{table}")
    result = report("train_step", args, device, rows, ["erc", "active_params_m", "total_params_m", "tokens_per_step", "median_ms", "p10_ms", "p90_ms", "tokens_per_s", "mfu", "erc_overhead"])
    return result


if __name__ == "__main__":
    main()
