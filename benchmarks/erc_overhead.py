"""ERC loss over all MoE layers, forward + backward: the paper's pseudocode per layer vs ercstudy's erc_loss.

    python benchmarks/erc_overhead.py                 # GPU: the paper's 3B shape and a 24-layer, 256-expert shape
    python benchmarks/erc_overhead.py --tiny          # CPU smoke run (tests)

Variants (same inputs, same noise):
  pseudocode   the paper's algorithm one layer at a time: proxies, then for each layer the
               [n, d] x [n, d, D] products and their norms (a Python loop over layers)
  batched      ercstudy.trainables.erc.erc_loss: one batched matmul over (layers x experts), fp32
  batched_bf16 the same with bf16 operands and an fp32 norm (GPU only)
Before timing, the fp32 variants' loss and gradients are checked against `batched` in float64
(max relative error within 1e-5), and on GPU batched_bf16's M against fp32's (within 1e-2:
bf16 operands move the relu kinks, so its gradients are not compared). The JSON records each check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import max_rel_err, parser, peak_memory_mb, report, resolve, sync, time_ms, verify  # noqa: E402
from ercstudy.trainables.erc import erc_from_activations, noise_bound  # noqa: E402

SHAPES = [  # (layers, n, d, D)
    (12, 64, 1536, 768),  # the paper's 3B model
    (24, 256, 1536, 768),
]
TINY = [(2, 8, 32, 16), (3, 16, 24, 8)]
CHECK_SHAPE = (2, 16, 64, 32)  # the correctness check's shape on GPU runs (float64 at the benchmark shapes is slow)
FP32_TOLERANCE = 1e-5  # float32 against float64: about 6e-7 observed at (12, 64, 256, 128)
BF16_TOLERANCE = 1e-2  # M with bf16 operands against fp32
COLUMNS = ["shape", "variant", "median_ms", "p10_ms", "p90_ms", "speedup_vs_pseudocode", "tflops", "peak_mb"]


def pseudocode(router, gate, noise, alpha):
    """The paper's pseudocode, applied layer by layer."""
    losses = []
    for layer in range(router.shape[0]):
        r = router[layer].float()
        eps = noise_bound(r)
        proxies = r * (1 + eps[:, None] * (2 * noise[layer] - 1))
        m = torch.stack([torch.linalg.vector_norm(proxies @ gate[layer, j].float(), dim=-1) for j in range(gate.shape[1])], dim=-1)
        losses.append(erc_from_activations(m, alpha))
    return torch.stack(losses)


def batched(router, gate, noise, alpha, operand_dtype=torch.float32):
    eps = noise_bound(router)
    acc = torch.promote_types(operand_dtype, torch.float32)  # fp32 norms, or fp64 for the check
    proxies = router.to(acc) * (1 + eps[..., None] * (2 * noise - 1))
    h = proxies.to(operand_dtype).unsqueeze(-3) @ gate.to(operand_dtype)  # [L, n, n, D]
    m = torch.linalg.vector_norm(h.to(acc), dim=-1).transpose(-1, -2)
    return erc_from_activations(m, alpha), m


def make_inputs(shape, device, dtype, seed=0):
    L, n, d, D = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    router = (torch.randn(L, n, d, generator=g) * 0.02).to(device, dtype).requires_grad_()
    gate = (torch.randn(L, n, d, D, generator=g) * 0.02).to(device, dtype).requires_grad_()
    noise = torch.rand(L, n, d, generator=g).to(device)
    return router, gate, noise


def label(shape) -> str:
    L, n, d, D = shape
    return f"L{L} n{n} d{d} D{D}"


def check(shape, device) -> list[dict]:
    """The fp32 variants against `batched` in float64 on this device: the loss and its gradients."""
    router, gate, noise = make_inputs(shape, device, torch.float64)

    def loss_and_grads(fn):
        loss = fn(router, gate, noise, 1.0).sum()
        return (loss.detach(), *torch.autograd.grad(loss, (router, gate)))

    ref = loss_and_grads(lambda *a: batched(*a, torch.float64)[0])
    checks = []
    for name, fn in {"pseudocode": pseudocode, "batched": lambda *a: batched(*a)[0]}.items():
        err = max(max_rel_err(got, want) for got, want in zip(loss_and_grads(fn), ref))
        checks.append(verify(f"{label(shape)}: {name} loss and gradients vs float64", err, FP32_TOLERANCE))
    return checks


def check_bf16(shape, device) -> dict:
    """M with bf16 operands against M in fp32, at the benchmark shape."""
    router, gate, noise = make_inputs(shape, device, torch.float32)
    with torch.no_grad():
        m32, m16 = batched(router, gate, noise, 1.0)[1], batched(router, gate, noise, 1.0, torch.bfloat16)[1]
    return verify(f"{label(shape)}: batched_bf16 M vs fp32", max_rel_err(m16, m32), BF16_TOLERANCE)


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device, dtype = resolve(args)
    shapes = TINY if args.tiny else SHAPES
    rows, checks = [], [c for shape in (shapes if args.tiny else [CHECK_SHAPE]) for c in check(shape, device)]
    for shape in shapes:
        inputs = make_inputs(shape, device, dtype)
        variants = {"pseudocode": pseudocode, "batched": lambda *a: batched(*a)[0]}
        if device.type == "cuda":
            variants["batched_bf16"] = lambda *a: batched(*a, torch.bfloat16)[0]
            checks.append(check_bf16(shape, device))
        L, n, d, D = shape
        flops = 3 * 2 * L * n * n * d * D  # forward matmul + its two backward matmuls
        base = None
        for name, fn in variants.items():
            def step(fn=fn, inputs=inputs):
                router, gate, noise = inputs
                fn(router, gate, noise, 1.0).sum().backward()
                router.grad = gate.grad = None
            try:
                t = time_ms(step, device, warmup=args.warmup, repeats=args.repeats)
                mem = peak_memory_mb(step, device)
            except torch.OutOfMemoryError:
                sync(device)
                rows.append({"shape": label(shape), "variant": name, "median_ms": None, "note": "out of memory"})
                continue
            base = base or t["median_ms"]
            rows.append({"shape": label(shape), "variant": name, **t, "speedup_vs_pseudocode": base / t["median_ms"],
                         "tflops": flops / t["median_ms"] / 1e9, "peak_mb": mem, "note": ""})
    return report("erc_overhead", args, device, rows, [*COLUMNS, "note"], checks=checks)


if __name__ == "__main__":
    main()
