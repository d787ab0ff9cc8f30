"""MoE layer forward + backward: ercstudy's `grouped` backend vs its `deepspeed` backend vs DeepSpeed's own layer,
same weights, same tokens; and the grouped expert GEMMs alone.

    python benchmarks/moe_layer.py            # GPU, bf16: the paper's 3B layer shape, a wider one, a 256-expert one
    python benchmarks/moe_layer.py --tiny     # CPU smoke run (tests)
    python benchmarks/moe_layer.py --device cpu --shape 64,64,8,2,1024    # one shape of your own (d,D,n,k,tokens)

Variants, per shape:
  grouped        moe.GroupedMoE, the layer training builds for backend grouped (dropless)
  deepspeed      parallelize.DeepSpeedMoE, what training builds for backend deepspeed: DeepSpeed's MoE
                 (top-k gating, no dropped tokens) plus ercstudy's routing recomputation for its losses
  deepspeed_moe  that layer's inner deepspeed.moe.layer.MoE alone (DeepSpeed's own layer, the target's baseline)
  grouped_mm     the grouped layer's expert GEMMs alone (gate_up and down, forward and both backward
                 products) on rows already sorted by expert, with the counts the router chose for these tokens
  aoe            aoe.AoEMoE, the Autonomy-of-Experts layer of `moe.kind: aoe` (no router: every expert's
                 low-rank gate activation pre-computed for every token, the experts chosen by its norm), its
                 rank matched to the routed layer's parameter count: the cost the paper compares ERC against
The ercstudy layers backpropagate their output and their LB + z losses (weighted as a trial weighs them),
DeepSpeed's layer its output and its l_aux: what a training step sends back through each.

Reports the median time, TFLOP/s counted on the expert matmuls (3 projections x 2 FLOPs x tokens x k
x d x D, forward; x3 for forward + backward; AoE's own count: its pre-computation n x d x r for every
token, then r x D + 2 x d x D for each of its k experts) divided by each row's own time: on the layer
rows the whole layer's time, on the grouped_mm row the GEMMs' (so the two grouped rows give both
figures), the speed-up of grouped over each DeepSpeed variant, AoE's time and (GPU) peak memory as
ratios to grouped's, and (GPU) the peak memory per 1k tokens. A variant that runs out of GPU memory
gets a row saying so; the others are still timed.

Before timing, grouped and deepspeed are checked against each other: the output and the gradients
of the input and of every parameter (router, gate, up, down; grouped's gate_up split into its gate
and up halves, DeepSpeed's per-expert parameters stacked), max relative error within 3e-2 in bf16,
1e-4 in fp32; the JSON records each check. Routing is discrete: a bf16 router matmul rounds the
logits and picks other experts than an fp32 one for a few percent of tokens, so the grouped layer's
router weight is held in fp32 here, as DeepSpeed's gate computes its logits (both then choose the same
experts); the expert weights and activations are in the benchmark dtype.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import max_rel_err, parser, peak_memory_mb, report, resolve, sync, time_ms, verify  # noqa: E402
from ercstudy.trainables.aoe import AoEMoE, matched_rank  # noqa: E402
from ercstudy.trainables.moe import (  # noqa: E402
    GroupedMoE,
    MoEConfig,
    count_per_expert,
    grouped_mm,
    random_expert_weights,
    route,
)
from ercstudy.trainables.parallelize import moe_layer  # noqa: E402

SHAPES = [  # (d, D, n, k, tokens)
    (1536, 768, 64, 8, 16384),  # the paper's 3B layer
    (2048, 1024, 64, 8, 16384),
    (2048, 512, 256, 8, 16384),
]
TINY = [(32, 16, 8, 2, 256), (24, 8, 16, 4, 128)]
VARIANTS = ("grouped", "deepspeed", "deepspeed_moe", "grouped_mm", "aoe")
CHECKED = ("output", "input gradient", "router gradient", "gate gradient", "up gradient", "down gradient")
COLUMNS = ["shape", "variant", "median_ms", "p10_ms", "p90_ms", "tflops", "speedup_vs_deepspeed", "speedup_vs_deepspeed_moe",
           "time_vs_grouped", "memory_vs_grouped", "peak_mb_per_1k_tokens", "note"]
MOE = MoEConfig(lb_weight=0.01, z_weight=0.001)  # a trial's default loss weights


def label(shape) -> str:
    d, D, n, k, tokens = shape
    return f"d{d} D{D} n{n} k{k} T{tokens}"


def build(backend: str, shape, device, dtype, weights):
    """ercstudy's layer of `backend` with `weights` (already rounded to `dtype`), on `device` in `dtype`; the
    grouped layer's router in fp32, as DeepSpeed's gate computes its logits (module docstring)."""
    d, D, n, k, _ = shape
    layer = moe_layer(MoEConfig(backend=backend, num_experts=n, top_k=k, expert_dim=D, drop_tokens=False), d)
    layer.load_expert_weights(weights)
    layer = layer.to(device, dtype)
    if isinstance(layer, GroupedMoE):
        layer.router.data = layer.router.data.float()
    return layer


def build_aoe(shape, device, dtype):
    """The AoE layer at `shape`, its rank matched to the routed layer's parameter count (aoe.matched_rank)."""
    d, D, n, k, _ = shape
    layer = AoEMoE(MoEConfig(kind="aoe", num_experts=n, top_k=k, expert_dim=D), d)
    layer.reset_parameters(std=0.02, out_std=0.02, generator=torch.Generator().manual_seed(2))
    return layer.to(device, dtype)


def expert_flops(variant: str, shape) -> float:
    """Forward + backward FLOPs of the variant's expert matmuls on the shape's tokens."""
    d, D, n, k, tokens = shape
    if variant == "aoe":
        r = matched_rank(d, D)
        return 3 * 2 * tokens * (n * d * r + k * (r * D + 2 * d * D))
    return 3 * 3 * 2 * tokens * k * d * D


def parameter_grads(layer) -> dict[str, torch.Tensor]:
    """The layer's parameter gradients under expert_weights()'s names and shapes: router [n, d], gate/up [n, d, D],
    down [n, D, d]."""
    if isinstance(layer, GroupedMoE):
        gate_up, D = layer.experts.gate_up.grad, layer.experts.expert_dim
        return {"router": layer.router.grad, "gate": gate_up[..., :D], "up": gate_up[..., D:], "down": layer.experts.down.grad}
    inner = layer.moe.deepspeed_moe  # DeepSpeedMoE: router at gate.wg, one module per expert
    experts = inner.experts.deepspeed_experts
    return {"router": inner.gate.wg.weight.grad,
            **{name: torch.stack([getattr(e, name).grad for e in experts]) for name in ("gate", "up", "down")}}


def check_backends(layers, x, grad, tolerance: float, shape_label: str) -> list[dict]:
    """grouped against deepspeed on the same tokens: the output, and the gradients it sends to x and to every
    parameter (the output's gradient only: both layers' losses are recomputed from the same routing)."""
    got = {}
    for backend in ("grouped", "deepspeed"):
        layer = layers[backend]
        out = layer(x)[0]
        out.backward(grad)
        got[backend] = {"output": out.detach(), "input gradient": x.grad,
                        **{f"{name} gradient": g for name, g in parameter_grads(layer).items()}}
        x.grad = None
        layer.zero_grad(set_to_none=True)
    return [verify(f"{shape_label}: grouped vs deepspeed {what}", max_rel_err(got["grouped"][what], got["deepspeed"][what]),
                   tolerance) for what in CHECKED]


def layer_step(variant: str, layer, x, grad):
    """One forward + backward of a layer, with what a training step backpropagates through it."""
    one = torch.ones((), device=x.device)

    def step():
        if variant == "deepspeed_moe":
            out, l_aux, _ = layer(x)
            aux = MOE.lb_weight * l_aux
        else:
            out, stats = layer(x)
            aux = MOE.lb_weight * stats.lb_loss + MOE.z_weight * stats.z_loss
        torch.autograd.backward((out, aux), (grad, one))
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return step


def gemm_step(shape, tokens_per_expert_E, device, dtype):
    """The grouped layer's four expert GEMMs (x @ gate_up, h @ down and their backward products) on rows sorted by
    expert with these counts: what the layer would take if its glue (gather, SiLU x up, scaling, unsort) cost nothing."""
    d, D, n, k, tokens = shape
    offsets_E = torch.cumsum(tokens_per_expert_E, dim=0).to(torch.int32)
    gen = torch.Generator(device=device).manual_seed(1)
    rand = lambda *s, grad=True: torch.randn(*s, generator=gen, device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    x_SD, h_SD, gate_up, down = rand(tokens * k, d), rand(tokens * k, D), rand(n, d, 2 * D), rand(n, D, d)
    g_gu, g_down = rand(tokens * k, 2 * D, grad=False), rand(tokens * k, d, grad=False)

    def step():
        torch.autograd.backward((grouped_mm(x_SD, gate_up, offsets_E), grouped_mm(h_SD, down, offsets_E)), (g_gu, g_down))
        for t in (x_SD, h_SD, gate_up, down):
            t.grad = None

    return step


def out_of_memory_row(shape, variant: str, when: str) -> dict:
    return {"shape": label(shape), "variant": variant, "median_ms": None, "note": f"out of memory ({when})"}


def free(device) -> None:
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_shape(shape, args, device, dtype, tolerance) -> tuple[list[dict], list[dict]]:
    d, D, n, k, tokens = shape
    gen = torch.Generator().manual_seed(0)
    weights = {name: w.to(dtype).float() for name, w in  # rounded once: every variant holds the same values
               random_expert_weights(n, d, D, std=0.02, out_std=0.02, generator=gen).items()}
    x = torch.randn(tokens, d, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.randn(tokens, d, generator=gen).to(device, dtype)
    try:
        layers = {b: build(b, shape, device, dtype, weights) for b in ("grouped", "deepspeed")}
        layers["deepspeed_moe"] = layers["deepspeed"].moe
        layers["aoe"] = build_aoe(shape, device, dtype)
        checks = check_backends(layers, x, grad, tolerance, label(shape))
        with torch.no_grad():  # the counts the router chooses for these tokens, for the GEMMs-alone row
            counts_E = count_per_expert(route(x, layers["grouped"].router, k).experts_TK, n).to(torch.int64)
    except torch.OutOfMemoryError:
        layers = None
        free(device)
        return [out_of_memory_row(shape, v, "the check: nothing timed") for v in VARIANTS], []
    rows = []
    for variant in VARIANTS:
        try:
            step = gemm_step(shape, counts_E, device, dtype) if variant == "grouped_mm" else layer_step(variant, layers[variant], x, grad)
            t = time_ms(step, device, warmup=args.warmup, repeats=args.repeats)
            mem = peak_memory_mb(step, device)
        except torch.OutOfMemoryError:
            step = None
            free(device)
            rows.append(out_of_memory_row(shape, variant, "timing"))
            continue
        rows.append({"shape": label(shape), "variant": variant, **t, "tflops": expert_flops(variant, shape) / t["median_ms"] / 1e9,
                     "peak_mb_per_1k_tokens": mem and mem * 1000 / tokens, "note": ""})
        del step
    times = {r["variant"]: r["median_ms"] for r in rows}
    grouped = next(r for r in rows if r["variant"] == "grouped")
    for baseline in ("deepspeed", "deepspeed_moe"):
        grouped[f"speedup_vs_{baseline}"] = times[baseline] / times["grouped"] if times[baseline] and times["grouped"] else None
    aoe = next(r for r in rows if r["variant"] == "aoe")
    aoe["time_vs_grouped"] = times["aoe"] / times["grouped"] if times["aoe"] and times["grouped"] else None
    memory = {r["variant"]: r.get("peak_mb_per_1k_tokens") for r in rows}
    aoe["memory_vs_grouped"] = memory["aoe"] / memory["grouped"] if memory["aoe"] and memory["grouped"] else None
    return rows, checks


def parse_shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in text.split(","))
    if len(shape) != 5:
        raise ValueError(f"{text}: a shape is d,D,n,k,tokens")
    return shape


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--shape", type=parse_shape, action="append", metavar="d,D,n,k,tokens",
                   help="a layer shape to time instead of the default ones (repeatable), e.g. 64,64,8,2,1024")
    args = p.parse_args(argv)
    device, dtype = resolve(args)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
    rows, checks = [], []
    for shape in args.shape or (TINY if args.tiny else SHAPES):
        shape_rows, shape_checks = bench_shape(shape, args, device, dtype, tolerance)
        rows += shape_rows
        checks += shape_checks
        free(device)
    return report("moe_layer", args, device, rows, COLUMNS, checks=checks)


if __name__ == "__main__":
    main()
