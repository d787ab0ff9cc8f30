"""MoE layer forward + backward: the `grouped` backend vs the `deepspeed` backend (deepspeed.moe.layer.MoE,
top-k gating, no dropped tokens), same weights, same tokens.

    python benchmarks/moe_layer.py            # GPU, bf16: the paper's 3B layer shape, a wider one, a 256-expert one
    python benchmarks/moe_layer.py --tiny     # CPU smoke run (tests)

Reports the median time, TFLOP/s counted on the expert matmuls (3 projections x 2 FLOPs x
tokens x k x d x D, forward; x3 for forward + backward), the speed-up of grouped over
deepspeed and (GPU) the peak memory per 1k tokens. Before timing, both backends' outputs and
input gradients are checked against each other (max relative error within 3e-2 in bf16, 1e-4 in
fp32), and the JSON records each check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import max_rel_err, parser, peak_memory_mb, report, resolve, time_ms, verify  # noqa: E402
from ercstudy.trainables.moe import MoEConfig, random_expert_weights  # noqa: E402
from ercstudy.trainables.parallelize import moe_layer  # noqa: E402

SHAPES = [  # (d, D, n, k, tokens)
    (1536, 768, 64, 8, 16384),  # the paper's 3B layer
    (2048, 1024, 64, 8, 16384),
    (2048, 512, 256, 8, 16384),
]
TINY = [(32, 16, 8, 2, 256), (24, 8, 16, 4, 128)]
COLUMNS = ["shape", "backend", "median_ms", "p10_ms", "p90_ms", "tflops", "speedup_vs_deepspeed", "peak_mb_per_1k_tokens"]


def build(backend: str, shape, device, dtype, weights):
    d, D, n, k, _ = shape
    layer = moe_layer(MoEConfig(backend=backend, num_experts=n, top_k=k, expert_dim=D, drop_tokens=False), d)
    layer.load_expert_weights(weights)
    layer = layer.to(device, dtype)
    # deepspeed: time DeepSpeed's own layer (the backend adds a routing recomputation for its metrics)
    return layer.moe if backend == "deepspeed" else layer


def check_backends(layers, x, grad, tolerance: float, label: str) -> list[dict]:
    """grouped against deepspeed on the same tokens: the layer's output and the gradient it sends back to x."""
    got = {}
    for backend, layer in layers.items():
        out = layer(x)[0]
        out.backward(grad)
        got[backend] = out.detach(), x.grad
        x.grad = None
        layer.zero_grad(set_to_none=True)
    (out_g, dx_g), (out_d, dx_d) = got["grouped"], got["deepspeed"]
    return [verify(f"{label}: grouped vs deepspeed output", max_rel_err(out_g, out_d), tolerance),
            verify(f"{label}: grouped vs deepspeed input gradient", max_rel_err(dx_g, dx_d), tolerance)]


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device, dtype = resolve(args)
    rows, checks = [], []
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for shape in TINY if args.tiny else SHAPES:
        d, D, n, k, tokens = shape
        label = f"d{d} D{D} n{n} k{k} T{tokens}"
        gen = torch.Generator().manual_seed(0)
        weights = random_expert_weights(n, d, D, std=0.02, out_std=0.02, generator=gen)
        x = torch.randn(tokens, d, generator=gen).to(device, dtype).requires_grad_()
        grad = torch.randn(tokens, d, generator=gen).to(device, dtype)
        layers = {b: build(b, shape, device, dtype, weights) for b in ("grouped", "deepspeed")}
        checks += check_backends(layers, x, grad, tolerance, label)
        flops = 3 * 3 * 2 * tokens * k * d * D
        times = {}
        for backend, layer in layers.items():
            def step(layer=layer, x=x, grad=grad):
                layer(x)[0].backward(grad)
                x.grad = None
                layer.zero_grad(set_to_none=True)
            t = time_ms(step, device, warmup=args.warmup, repeats=args.repeats)
            mem = peak_memory_mb(step, device)
            times[backend] = t["median_ms"]
            rows.append({"shape": label, "backend": backend, **t, "tflops": flops / t["median_ms"] / 1e9,
                         "peak_mb_per_1k_tokens": mem and mem * 1000 / tokens})
        rows[-2]["speedup_vs_deepspeed"] = times["deepspeed"] / times["grouped"]
    return report("moe_layer", args, device, rows, COLUMNS, checks=checks)


if __name__ == "__main__":
    main()
