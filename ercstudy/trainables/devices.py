"""Peak dense bf16 tensor-core throughput of the accelerator a worker runs on, for MFU.

One table, matched against `torch.cuda.get_device_name()` most specific first. Figures are the
vendor's dense (no 2:4 sparsity) BF16 tensor-core peaks per GPU, from the datasheets named beside
them. A device not in the table reports no MFU rather than a wrong one.
"""

from __future__ import annotations

import re

import torch

# (pattern on the device name, TFLOP/s dense bf16, source)
PEAKS: tuple[tuple[str, float, str], ...] = (
    (r"H100.*NVL", 835.0, "NVIDIA H100 datasheet (H100 NVL: 1,671 TFLOPS with sparsity)"),
    (r"H100.*PCIe", 756.0, "NVIDIA H100 datasheet (H100 PCIe: 1,513 TFLOPS with sparsity)"),
    (r"H100", 989.0, "NVIDIA H100 datasheet (H100 SXM: 1,979 TFLOPS with sparsity)"),
    (r"H200.*NVL", 835.0, "NVIDIA H200 datasheet (H200 NVL: 1,671 TFLOPS with sparsity)"),
    (r"H200", 989.0, "NVIDIA H200 datasheet (H200 SXM: 1,979 TFLOPS with sparsity)"),
    (r"B200", 2250.0, "NVIDIA HGX B200 datasheet (36 PFLOPS FP16/BF16 with sparsity for 8 GPUs)"),
    (r"A100", 312.0, "NVIDIA A100 datasheet (624 TFLOPS with sparsity; SXM and PCIe alike)"),
    (r"L40S", 362.0, "NVIDIA L40S datasheet (733 TFLOPS with sparsity)"),
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet (242 TFLOPS with sparsity)"),
)


# GB of memory (as sold, 1e9 bytes) of each GPU type as Ray names it in a node's resources (`accelerator_type:<type>`,
# ray/util/accelerators/accelerators.py), the smallest model of the type: the most a study can count on before its
# workers start (each worker then checks its own device's real size, engine.check_fits).
GPU_MEMORY_GB = {"V100": 16, "P100": 12, "T4": 16, "P4": 8, "K80": 12, "A10G": 24, "L4": 24, "L40S": 48, "A100": 40,
                 "A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 141, "H20": 96, "B200": 192}


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a device named `name` (e.g. "NVIDIA H100 80GB HBM3"), or None if unknown."""
    for pattern, tflops, _ in PEAKS:
        if re.search(pattern, name):
            return tflops
    return None


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this worker has held so far, in MiB: allocated by torch on a GPU (no sync: a host-side counter),
    the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def system_metrics(device: torch.device) -> dict[str, float]:
    """This worker's machine, in MLflow's own system-metric names (mlflow/system_metrics: the UI's System metrics tab
    shows `system/...` metrics): CPU utilisation (the whole machine's, since the previous call) and memory; on a GPU
    its memory in use (the whole device's, as nvidia-smi shows) and, where torch can ask NVML (`pip install
    nvidia-ml-py`), its utilisation. No MLflow in the worker: the driver logs these with the report."""
    import psutil  # a dependency of DeepSpeed and Ray

    memory = psutil.virtual_memory()
    out = {"system/cpu_utilization_percentage": psutil.cpu_percent(interval=None),
           "system/system_memory_usage_megabytes": memory.used / 1e6, "system/system_memory_usage_percentage": memory.percent}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        i = device.index or 0
        out[f"system/gpu_{i}_memory_usage_megabytes"] = (total - free) / 1e6
        out[f"system/gpu_{i}_memory_usage_percentage"] = 100 * (total - free) / total
        try:
            out[f"system/gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(device))
        except Exception:  # no NVML bindings (nvidia-ml-py): memory only
            pass
    return out


def device_peak_flops(device: torch.device) -> float | None:
    """FLOP/s of `device` for MFU; None on CPU and on GPUs the table does not know."""
    if device.type != "cuda":
        return None
    tflops = peak_tflops(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops else None
