"""Shared by the benchmark scripts: arguments, device facts, correctness checks, timing (median of
repeats), and output.

Timing follows the device tool's METHOD: warm-up calls first (kernel selection, allocator),
then `repeats` timed calls, each synchronised (CUDA events on GPU, perf_counter on CPU),
reported as the median with the 10th and 90th percentiles. Column names carry their units
(`_ms`, `_mb`, `tflops`, `tokens_per_s`); ratios (`speedup_*`, `mfu`) have none.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ercstudy.platform.study.tables import text_table


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke run of the whole script (tests)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", help="JSON results file (default: benchmarks/results/<script>-<device>.json)")
    return p


def resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    return device, dtype


def device_info(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64: one number per tensor, comparable across shapes."""
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).abs().max() / ref.abs().max()).item()


def norm_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| (Frobenius), in float64: for bf16 results, where a handful of discrete flips (a relu,
    a top-k) move single elements far while the tensor as a whole is right."""
    got, ref = got.detach().double(), ref.detach().double()
    return (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item()


MEASURES = {"max_rel_err": "max relative error", "norm_rel_err": "relative error in norm"}


def verify(what: str, err: float, tolerance: float, *, measure: str = "max_rel_err") -> dict[str, Any]:
    """The record of a correctness check for the JSON; a failed one (or a NaN error) stops the script."""
    passed = err <= tolerance
    if not passed:
        raise SystemExit(f"check failed: {what}: {MEASURES[measure]} {err:.2e} > {tolerance:.0e}")
    return {"check": what, measure: err, "tolerance": tolerance, "passed": passed}


def verify_that(what: str, passed: bool, **facts: Any) -> dict[str, Any]:
    """The record of a yes/no check (with the facts it rests on) for the JSON; a failed one stops the script."""
    if not passed:
        raise SystemExit(f"check failed: {what}: {facts}")
    return {"check": what, "passed": True, **facts}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one fn() call in milliseconds, synchronised (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def spread(values: Sequence[float], unit: str = "_ms") -> dict[str, float]:
    """Median, 10th and 90th percentile (nearest rank) of `values`, keyed median/p10/p90 + unit."""
    ordered = sorted(values)
    pick = lambda q: ordered[round(q * (len(ordered) - 1))]  # noqa: E731
    return {f"median{unit}": statistics.median(values), f"p10{unit}": pick(0.1), f"p90{unit}": pick(0.9)}


def time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> dict[str, float]:
    """Median, p10 and p90 wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    return spread([time_once_ms(fn, device) for _ in range(repeats)])


def time_paired(fns: dict[str, Callable[[], Any]], device: torch.device, *, warmup: int,
                repeats: int) -> tuple[dict[str, dict[str, float]], list[dict[str, float]]]:
    """Time several variants interleaved (a, b, a, b, ...), so that drift (clocks, temperature, a neighbour's
    load) falls on all of them alike. Returns each variant's time_ms-style spread and, per repeat, every
    variant's time (for paired ratios)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    pairs = [{name: time_once_ms(fn, device) for name, fn in fns.items()} for _ in range(repeats)]
    return {name: spread([p[name] for p in pairs]) for name in fns}, pairs


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocated memory of one fn() call above what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def write_results(script: str, args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]],
                  columns: list[str], *, checks: Sequence[dict[str, Any]] = (), complete: bool) -> tuple[dict[str, Any], Path]:
    """The results so far as JSON (`complete` false while cases remain): a run cut off by its budget still leaves
    every case it finished."""
    result = {"script": script, "args": vars(args), **device_info(device), "checks": list(checks), "columns": columns,
              "rows": rows, "complete": complete}
    out = Path(args.out or Path(__file__).parent / "results" / f"{script}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result, out


def report(script: str, args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]], columns: list[str],
           *, checks: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Print the checks that passed and a table of `rows`; write them with the columns and the device facts to JSON."""
    for c in checks:
        what = "".join(f": {text} {c[key]:.1e} <= {c['tolerance']:.0e}" for key, text in MEASURES.items() if key in c)
        print(f"check passed: {c['check']}{what}")
    print("\n".join(text_table(rows, columns, left=columns[:1])))
    result, out = write_results(script, args, device, rows, columns, checks=checks, complete=True)
    print(f"wrote {out}")
    return result
