"""The `ercstudy` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ercstudy.trainables.validation import ConfigError

DEFAULT_STORAGE = "ercstudy_results"


def _fail(message: str, code: int = 2) -> int:
    print(f"ercstudy: error: {message}", file=sys.stderr)
    return code


def describe(cfg) -> str:
    """One paragraph on what a trial will train, computed from the config alone."""
    tokens = cfg.steps * cfg.train.global_batch_size * cfg.model.seq_len
    return (
        f"model: {cfg.num_params() / 1e6:.2f}M params, {cfg.num_active_params() / 1e6:.2f}M active, "
        f"{cfg.flops_per_token() / 1e6:.1f} MFLOP/token (train) | MoE: {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}, "
        f"{cfg.num_moe_layers} MoE layers, backend {cfg.moe.backend} | ERC: "
        + (f"alpha {cfg.erc.alpha}, epsilon {cfg.erc.epsilon}, weight {cfg.erc.weight}, router_grad {cfg.erc.router_grad}" if cfg.erc.enabled else "off")
        + f"\nrun: {cfg.steps} steps x {cfg.train.global_batch_size} seqs x {cfg.model.seq_len} tokens = {tokens:,} tokens on "
        f"{cfg.resources.num_workers} worker(s) (ep_size {cfg.resources.ep_size}, grad accumulation {cfg.grad_accum}), data: {cfg.data.kind}"
    )


def cmd_train(args: argparse.Namespace) -> int:
    from ercstudy.trainables.config import load_trial_config
    from ercstudy.trainables.data import check_data
    from ercstudy.trainables.shards import DataError

    try:
        cfg = load_trial_config(args.file)
        check_data(cfg)
    except (ConfigError, DataError) as err:
        return _fail(str(err))
    name = args.name or Path(args.file).stem
    storage = os.path.abspath(args.storage)
    run_dir = Path(storage) / name
    if run_dir.exists() and not args.resume:
        return _fail(f"run {name!r} already exists in {storage}: pass --resume to continue it, or --name NAME for a new run")
    print(describe(cfg), flush=True)
    from ercstudy.trainables.train import run_trial

    result = run_trial(cfg, name=name, storage_path=storage)
    if result.error:
        return _fail(f"trial failed: {result.error}", 1)
    final = result.final
    print(f"\nfinished {name}: step {final.get('step')} | lm_loss {final.get('lm_loss', float('nan')):.4f} | "
          f"alpha* {final.get('alpha_star', float('nan')):.2f} | eps {final.get('eps_mean', float('nan')):.3f}")
    print(f"results: {result.path}\ncheckpoint: {result.checkpoint_path}")
    if result.stop_reason:
        return _fail(f"trial stopped: {result.stop_reason}", 1)
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from ercstudy.platform.prepare_data import prepare_data
    from ercstudy.trainables.shards import DataError

    try:
        prepare_data(
            args.inputs, args.out, vocab_size=args.vocab_size, seq_len=args.seq_len, eval_fraction=args.eval_fraction,
            column=args.column, rows_per_shard=args.rows_per_shard, seed=args.seed,
        )
    except DataError as err:
        return _fail(str(err))
    print(f"use it in a trial config:\n  data: {{kind: parquet, path: {args.out}}}\n  model: {{vocab_size: {args.vocab_size}, seq_len: <= {args.seq_len}}}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ercstudy", description="MoE studies with the expert-router coupling (ERC) loss.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run one trial (no Tune) on the local embedded Ray or RAY_ADDRESS")
    train.add_argument("file", help="a trial config YAML, or a study YAML whose `base:` is one")
    train.add_argument("--name", help="run name (default: the file's stem); the run directory is STORAGE/NAME")
    train.add_argument("--storage", default=DEFAULT_STORAGE, help=f"results directory (default: ./{DEFAULT_STORAGE})")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run of the same name from its last checkpoint")
    train.set_defaults(func=cmd_train)

    prep = sub.add_parser("prepare-data", help="tokenize text files (or a Parquet text column) into Parquet token shards")
    prep.add_argument("inputs", nargs="+", help="text files (documents separated by blank lines) or Parquet files; each file is one domain")
    prep.add_argument("--out", required=True, help="output directory (must be new or empty)")
    prep.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size, trained on the inputs (default: 4096)")
    prep.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default: 256)")
    prep.add_argument("--eval-fraction", type=float, default=0.05, help="share of sequences held out for evaluation (default: 0.05)")
    prep.add_argument("--column", help="text column of Parquet inputs (default: text)")
    prep.add_argument("--rows-per-shard", type=int, default=8192, help="sequences per Parquet file (default: 8192)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the train/eval split (default: 0)")
    prep.set_defaults(func=cmd_prepare_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
