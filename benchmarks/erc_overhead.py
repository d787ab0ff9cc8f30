"""ERC loss over all MoE layers, forward + backward: the paper's pseudocode per layer vs ercstudy's erc_loss.

    python benchmarks/erc_overhead.py                 # GPU: the paper's 3B shape and a 24-layer, 256-expert shape
    python benchmarks/erc_overhead.py --tiny          # CPU smoke run (tests)

Variants (same inputs, same noise, the same dtype: bf16 on GPU):
  pseudocode   the paper's algorithm one layer at a time: proxies, then for each layer and expert the
               [n, d] x [d, D] product and its norms (Python loops over layers and experts; the stacked
               weights are unbound once, so its backward costs what the pseudocode's does, linear in
               layers x experts, not a full-size zero gradient per slice)
  erc_loss     ercstudy.trainables.erc.erc_loss, the one implementation training calls (its own
               noise draw from a seeded generator included)
Before timing, both variants' loss and gradients are checked in fp32 against the pseudocode in float64
(max relative error within 1e-5), and when the timing runs in bf16, erc_loss on bf16 operands too
(loss within 1e-2, each gradient within 5e-2 in norm); a failed check stops the script, and the JSON
records each check. When the pseudocode does not fit in memory its row says so and no speedup is
claimed (the baseline is never swapped for another). The JSON is written after every shape.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    max_rel_err,
    norm_rel_err,
    parser,
    peak_memory_mb,
    report,
    resolve,
    sync,
    time_ms,
    verify,
    write_results,
)
from ercstudy.trainables.erc import erc_from_activations, erc_loss, noise_bound  # noqa: E402

SHAPES = [  # (layers, n, d, D)
    (12, 64, 1536, 768),  # the paper's 3B model
    (24, 256, 1536, 768),
]
TINY = [(2, 8, 32, 16), (3, 16, 24, 8)]
CHECK_SHAPE = (2, 16, 64, 32)  # the correctness check's shape on GPU runs (float64 at the benchmark shapes is slow)
FP32_TOLERANCE = 1e-5  # float32 against float64: about 6e-7 observed at (12, 64, 256, 128)
BF16_CHECK_SHAPE = (12, 64, 256, 128)  # the bf16 check's shape on GPU runs
# bf16 operands against float64 on the same (bf16) values, CPU: loss 1e-4 to 3e-4; gradients 0.9e-2 to 1.5e-2 in
# norm, up to 6e-2 in their largest element (a relu that flips moves single entries: hence the norm)
BF16_LOSS_TOLERANCE, BF16_GRAD_TOLERANCE = 1e-2, 5e-2
NOISE_SEED = 1234
COLUMNS = ["shape", "variant", "dtype", "median_ms", "p10_ms", "p90_ms", "speedup_vs_pseudocode", "tflops", "peak_mb"]


def pseudocode(router, gate, noise, alpha, dtype=torch.float32):
    """The paper's pseudocode, applied layer by layer, in `dtype` (float64: the reference)."""
    losses = []
    for r, layer_gates, u in zip(router.unbind(0), gate.unbind(0), noise.unbind(0)):  # unbound once: a linear backward
        r = r.to(dtype)
        eps = noise_bound(r).to(dtype)
        proxies = r * (1 + eps[:, None] * (2 * u.to(dtype) - 1))
        m = torch.stack([torch.linalg.vector_norm(proxies @ g.to(dtype), dim=-1) for g in layer_gates.unbind(0)], dim=-1)
        losses.append(erc_from_activations(m, alpha))
    return torch.stack(losses)


def ercstudy(router, gate, noise, alpha, dtype=None):
    """ercstudy's one implementation, as training calls it: erc.erc_loss over the stacked layers, in its operands'
    dtype (`dtype` is the pseudocode's knob; erc_loss is not told).

    `noise` is what erc_loss draws from a generator seeded NOISE_SEED on this device (noise_for),
    so both variants see the same proxies."""
    generator = torch.Generator(device=router.device).manual_seed(NOISE_SEED)
    return erc_loss(router, gate, alpha=alpha, generator=generator).loss


def noise_for(shape, device):
    """The uniform draws erc_loss makes for router rows of `shape` [L, n, d] (make_proxies: one torch.rand)."""
    return torch.rand(shape, generator=torch.Generator(device=device).manual_seed(NOISE_SEED), device=device, dtype=torch.float32)


def make_inputs(shape, device, dtype, seed=0):
    L, n, d, D = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    router = (torch.randn(L, n, d, generator=g) * 0.02).to(device, dtype).requires_grad_()
    gate = (torch.randn(L, n, d, D, generator=g) * 0.02).to(device, dtype).requires_grad_()
    return router, gate, noise_for((L, n, d), device)


def label(shape) -> str:
    L, n, d, D = shape
    return f"L{L} n{n} d{d} D{D}"


VARIANTS = {"pseudocode": pseudocode, "erc_loss": ercstudy}


def check(shape, device) -> list[dict]:
    """Each variant against the pseudocode in float64 on this device: the loss and its gradients."""
    router, gate, noise = make_inputs(shape, device, torch.float32)

    def loss_and_grads(fn):
        loss = fn(router, gate, noise, 1.0).sum()
        return (loss.detach(), *torch.autograd.grad(loss, (router, gate)))

    ref = loss_and_grads(lambda *a: pseudocode(*a, torch.float64))
    checks = []
    for name, fn in VARIANTS.items():
        err = max(max_rel_err(got, want) for got, want in zip(loss_and_grads(fn), ref))
        checks.append(verify(f"{label(shape)}: {name} loss and gradients vs float64", err, FP32_TOLERANCE))
    return checks


def check_bf16(shape, device) -> list[dict]:
    """erc_loss with bf16 router and gates (as a bf16 trial holds them) against the float64 pseudocode on the
    same values: the loss (max relative error) and each gradient (relative error in norm)."""
    router, gate, noise = make_inputs(shape, device, torch.bfloat16)
    ref_inputs = [t.detach().double().requires_grad_() for t in (router, gate)]
    ref = pseudocode(*ref_inputs, noise, 1.0, torch.float64).sum()
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    got = ercstudy(router, gate, noise, 1.0).sum()
    grads = torch.autograd.grad(got, (router, gate))
    checks = [verify(f"{label(shape)}: erc_loss in bf16 vs float64: loss", max_rel_err(got, ref), BF16_LOSS_TOLERANCE)]
    for name, g, want in zip(("router", "gate"), grads, ref_grads):
        assert g.dtype == torch.bfloat16  # the gradient a bf16 parameter receives
        checks.append(verify(f"{label(shape)}: erc_loss in bf16 vs float64: {name} gradient", norm_rel_err(g, want),
                             BF16_GRAD_TOLERANCE, measure="norm_rel_err"))
    return checks


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device, dtype = resolve(args)
    shapes = TINY if args.tiny else SHAPES
    rows, checks = [], [c for shape in (shapes if args.tiny else [CHECK_SHAPE]) for c in check(shape, device)]
    if dtype == torch.bfloat16:  # the timed variants run on bf16 operands: their error is gated too
        checks += check_bf16(shapes[0] if args.tiny else BF16_CHECK_SHAPE, device)
    for shape in shapes:
        inputs = make_inputs(shape, device, dtype)
        L, n, d, D = shape
        flops = 3 * 2 * L * n * n * d * D  # forward matmul + its two backward matmuls
        base = None  # the pseudocode's time; None when it did not fit (then no speedup is claimed)
        for name, fn in VARIANTS.items():
            def step(fn=fn, inputs=inputs):
                router, gate, noise = inputs
                fn(router, gate, noise, 1.0, dtype).sum().backward()  # both in the timing's dtype
                router.grad = gate.grad = None
            try:
                t = time_ms(step, device, warmup=args.warmup, repeats=args.repeats)
                mem = peak_memory_mb(step, device)
            except torch.OutOfMemoryError:
                sync(device)
                rows.append({"shape": label(shape), "variant": name, "dtype": str(dtype).removeprefix("torch."), "median_ms": None, "note": "out of memory"})
                continue
            if name == "pseudocode":
                base = t["median_ms"]
            rows.append({"shape": label(shape), "variant": name, "dtype": str(dtype).removeprefix("torch."), **t,
                         "speedup_vs_pseudocode": base / t["median_ms"] if base else None,
                         "tflops": flops / t["median_ms"] / 1e9, "peak_mb": mem,
                         "note": "" if base else "pseudocode out of memory: no speedup"})
        write_results("erc_overhead", args, device, rows, [*COLUMNS, "note"], checks=checks, complete=False)
    return report("erc_overhead", args, device, rows, [*COLUMNS, "note"], checks=checks)


if __name__ == "__main__":
    main()
