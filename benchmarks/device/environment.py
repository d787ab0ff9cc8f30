"""The GPU machine's facts, first in a device session: what every later number ran on.

    python3 benchmarks/device/environment.py --out results/environment.json

torch, CUDA, cuDNN and NCCL versions, the GPU's name, compute capability and memory; which of torch's
scaled_dot_product_attention backends run the model's attention (bf16, causal, head dim 64); and whether
torch.nn.functional.grouped_mm runs the MoE's grouped GEMM without a host synchronisation (its fast kernel: compute
capability 9.x/10.x; elsewhere torch loops over the groups on the host). On a CPU it records what applies.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ercstudy.trainables.moe import grouped_mm_fast_path  # noqa: E402


def sdpa_backends(device: torch.device) -> dict[str, str]:
    """Each SDPA backend on the model's attention shape: "runs" or why not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, 8, 256, 64, device=device, dtype=dtype)
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            out[backend.name] = "runs"
        except RuntimeError as err:
            out[backend.name] = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    return out


def grouped_mm_record(device: torch.device) -> dict[str, object]:
    """Whether F.grouped_mm runs here, and whether it syncs with the host (torch's per-group fallback does)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(64, 128, device=device, dtype=dtype)
    w = torch.randn(4, 128, 64, device=device, dtype=dtype)
    offsets = torch.tensor([16, 32, 48, 64], device=device, dtype=torch.int32)
    record: dict[str, object] = {"expected_fast": grouped_mm_fast_path(device)}
    try:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")  # a host sync inside raises: the fallback loop
        F.grouped_mm(x, w, offs=offsets)
        record["runs"], record["host_sync"] = True, False
    except RuntimeError as err:
        record["runs"] = "synchroniz" not in str(err)
        record["host_sync"] = "synchroniz" in str(err)
        record["error"] = str(err).splitlines()[0][:200]
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    return record


def environment(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
    info["sdpa"] = sdpa_backends(device)
    info["grouped_mm"] = grouped_mm_record(device)
    return info


def main(argv=None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    info = environment(torch.device(args.device))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
