"""The GPU benchmarks run end to end on CPU at tiny sizes: correctness checks first (recorded, and fatal when
they fail), then timings, the table and the JSON with its columns, units and device facts."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import erc_overhead, moe_layer, prepare_data, train_step  # noqa: E402
from benchmarks.common import MEASURES  # noqa: E402

QUICK = ["--device", "cpu", "--tiny", "--warmup", "0", "--repeats", "2"]


def read_result(path: Path, columns: list[str]) -> dict:
    """The JSON a benchmark wrote, after the checks every benchmark promises: CPU device facts, the columns, and
    every check passed within its tolerance."""
    result = json.loads(path.read_text())
    assert result["device"] == "cpu" and result["torch"] == torch.__version__ and result["cpu"] and result["date"]
    assert result["args"]["device"] == "cpu" and result["args"]["tiny"]
    assert result["columns"] == columns
    for c in result["checks"]:
        assert c["passed"] and all(c[m] <= c["tolerance"] for m in MEASURES if m in c), c
    for r in result["rows"]:
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"], r
    return result


def printed_table(out: str, columns: list[str]) -> list[list[str]]:
    """The table a benchmark printed: the header line (the JSON's columns) and the lines below it."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split() == columns)
    return lines[head + 1 : next(i for i, line in enumerate(lines) if line.startswith("wrote "))]


def test_erc_overhead_checks_then_times_every_variant(tmp_path, capsys):
    result = erc_overhead.main([*QUICK, "--out", str(tmp_path / "erc.json")])
    columns = ["shape", "variant", "dtype", "median_ms", "p10_ms", "p90_ms", "speedup_vs_pseudocode", "tflops", "peak_mb", "note"]
    saved = read_result(tmp_path / "erc.json", columns)
    assert saved["complete"] is True
    assert saved == json.loads(json.dumps(result))
    shapes = {erc_overhead.label(s): s for s in erc_overhead.TINY}
    assert [c["check"] for c in saved["checks"]] == [f"{s}: {v} loss and gradients vs float64" for s in shapes
                                                     for v in ("pseudocode", "erc_loss")]
    assert all(c["tolerance"] == 1e-5 for c in saved["checks"])
    rows = saved["rows"]
    assert [(r["shape"], r["variant"]) for r in rows] == [(s, v) for s in shapes for v in ("pseudocode", "erc_loss")]
    for pseudo, batched in zip(rows[::2], rows[1::2]):
        L, n, d, D = shapes[pseudo["shape"]]
        for r in (pseudo, batched):
            assert set(r) == set(columns) and r["peak_mb"] is None  # peak memory is measured on GPU only
            assert r["tflops"] == pytest.approx(3 * 2 * L * n * n * d * D / r["median_ms"] / 1e9)
        assert pseudo["speedup_vs_pseudocode"] == 1.0
        assert batched["speedup_vs_pseudocode"] == pytest.approx(pseudo["median_ms"] / batched["median_ms"])
    assert len(printed_table(capsys.readouterr().out, columns)) == len(rows)


def test_erc_overhead_stops_before_timing_a_wrong_variant(tmp_path, monkeypatch, capsys):
    right = erc_overhead.pseudocode
    monkeypatch.setattr(erc_overhead, "pseudocode", lambda *args: right(*args) * 1.001)
    with pytest.raises(SystemExit, match=r"check failed: L2 n8 d32 D16: pseudocode loss and gradients vs float64"):
        erc_overhead.main([*QUICK, "--out", str(tmp_path / "erc.json")])
    assert not (tmp_path / "erc.json").exists() and "median_ms" not in capsys.readouterr().out


def test_the_benchmark_times_ercs_one_implementation_on_the_same_noise():
    """The erc_loss variant is erc.erc_loss itself, and the pseudocode sees the noise erc_loss draws."""
    import inspect

    from ercstudy.trainables.erc import erc_loss

    assert "erc_loss(" in inspect.getsource(erc_overhead.ercstudy)
    router, gate, noise = erc_overhead.make_inputs((3, 6, 10, 4), torch.device("cpu"), torch.float32)
    ours = erc_overhead.ercstudy(router, gate, noise, 0.7)
    direct = erc_loss(router, gate, alpha=0.7, generator=torch.Generator().manual_seed(erc_overhead.NOISE_SEED)).loss
    torch.testing.assert_close(ours, direct, rtol=0, atol=0)
    torch.testing.assert_close(erc_overhead.pseudocode(router, gate, noise, 0.7), ours)  # float32 both


def test_the_pseudocode_baseline_runs_in_the_timings_dtype_and_unbinds_its_weights_once(tmp_path):
    """bf16 against bf16 (a baseline in fp32 would flatter erc_loss), and a backward linear in layers x experts:
    no per-slice select, whose backward builds a full-size zero gradient for every (layer, expert)."""
    rows = erc_overhead.main([*QUICK, "--dtype", "bf16", "--out", str(tmp_path / "erc.json")])["rows"]
    assert {(r["variant"], r["dtype"]) for r in rows} == {("pseudocode", "bfloat16"), ("erc_loss", "bfloat16")}
    L, n, d, D = 3, 5, 8, 4
    router, gate, noise = erc_overhead.make_inputs((L, n, d, D), torch.device("cpu"), torch.float32)
    kinds, seen, todo = [], set(), [erc_overhead.pseudocode(router, gate, noise, 1.0).sum().grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds.append(type(node).__name__)
        todo += [next_fn for next_fn, _ in node.next_functions]
    assert "SelectBackward0" not in kinds and kinds.count("UnbindBackward0") == 2 + L  # router, gate, each layer's gates


def test_erc_overhead_claims_no_speedup_when_the_baseline_does_not_fit(tmp_path, monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("pseudocode too large")

    monkeypatch.setattr(erc_overhead, "VARIANTS", {**erc_overhead.VARIANTS, "pseudocode": out_of_memory})
    monkeypatch.setattr(erc_overhead, "check", lambda shape, device: [])
    rows = erc_overhead.main([*QUICK, "--out", str(tmp_path / "erc.json")])["rows"]
    assert [r["note"] for r in rows if r["variant"] == "pseudocode"] == ["out of memory"] * 2
    assert all(r["speedup_vs_pseudocode"] is None and "no speedup" in r["note"] for r in rows if r["variant"] == "erc_loss")


def test_moe_layer_checks_outputs_and_every_gradient_then_times_five_variants(tmp_path, capsys):
    moe_layer.main([*QUICK, "--out", str(tmp_path / "moe.json")])
    result = read_result(tmp_path / "moe.json", moe_layer.COLUMNS)
    shapes = {moe_layer.label(s): s for s in moe_layer.TINY}
    checked = ("output", "input gradient", "router gradient", "gate gradient", "up gradient", "down gradient")
    assert [c["check"] for c in result["checks"]] == [f"{s}: grouped vs deepspeed {what}" for s in shapes for what in checked]
    assert all(c["tolerance"] == 1e-4 for c in result["checks"])  # fp32 on CPU
    rows = result["rows"]
    variants = ("grouped", "deepspeed", "deepspeed_moe", "grouped_mm", "aoe")
    assert [(r["shape"], r["variant"]) for r in rows] == [(s, v) for s in shapes for v in variants]
    for i in range(0, len(rows), len(variants)):
        by = {r["variant"]: r for r in rows[i:i + len(variants)]}
        d, D, n, k, tokens = shapes[rows[i]["shape"]]
        r_aoe = moe_layer.matched_rank(d, D)
        for name, r in by.items():  # expert FLOPs over each row's own time: the whole layer's, or the GEMMs' alone
            flops = 3 * 2 * tokens * (n * d * r_aoe + k * (r_aoe * D + 2 * d * D)) if name == "aoe" else 3 * 3 * 2 * tokens * k * d * D
            assert r["tflops"] == pytest.approx(flops / r["median_ms"] / 1e9)
            assert r["peak_mb_per_1k_tokens"] is None and r["note"] == ""  # peak memory: GPU only
        grouped = by["grouped"]
        assert grouped["speedup_vs_deepspeed"] == pytest.approx(by["deepspeed"]["median_ms"] / grouped["median_ms"])
        assert grouped["speedup_vs_deepspeed_moe"] == pytest.approx(by["deepspeed_moe"]["median_ms"] / grouped["median_ms"])
        assert all("speedup_vs_deepspeed" not in by[v] for v in variants[1:])
        # AoE's cost beside the routed layer it is compared with; its memory ratio waits for a GPU's peak
        assert by["aoe"]["time_vs_grouped"] == pytest.approx(by["aoe"]["median_ms"] / grouped["median_ms"])
        assert by["aoe"]["memory_vs_grouped"] is None
        assert all("time_vs_grouped" not in by[v] for v in variants[:-1])
    assert len(printed_table(capsys.readouterr().out, moe_layer.COLUMNS)) == len(rows)


def test_moe_layer_maps_both_backends_gradients_to_the_same_names():
    """grouped's gate_up splits into gate and up; DeepSpeed's per-expert parameters stack: same names, same shapes,
    and after one backward the same values."""
    shape = moe_layer.TINY[0]
    d, D, n, k, tokens = shape
    weights = moe_layer.random_expert_weights(n, d, D, std=0.02, out_std=0.02, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    x = torch.randn(tokens, d)
    grads = {}
    for backend in ("grouped", "deepspeed"):
        layer = moe_layer.build(backend, shape, cpu, torch.float32, weights)
        layer(x)[0].square().sum().backward()
        grads[backend] = moe_layer.parameter_grads(layer)
    expected = {"router": (n, d), "gate": (n, d, D), "up": (n, d, D), "down": (n, D, d)}
    for backend, g in grads.items():
        assert {name: tuple(t.shape) for name, t in g.items()} == expected, backend
    for name in expected:
        torch.testing.assert_close(grads["grouped"][name], grads["deepspeed"][name], rtol=1e-4, atol=1e-6)


def test_moe_layer_stops_when_the_backends_disagree(tmp_path, monkeypatch):
    build = moe_layer.build

    def off_by_a_percent(backend, shape, device, dtype, weights):
        if backend == "deepspeed":
            weights = {name: w * 1.01 for name, w in weights.items()}
        return build(backend, shape, device, dtype, weights)

    monkeypatch.setattr(moe_layer, "build", off_by_a_percent)
    with pytest.raises(SystemExit, match=r"check failed: d32 D16 n8 k2 T256: grouped vs deepspeed output"):
        moe_layer.main([*QUICK, "--out", str(tmp_path / "moe.json")])
    assert not (tmp_path / "moe.json").exists()


def test_moe_layer_stops_when_only_a_parameter_gradient_disagrees(tmp_path, monkeypatch):
    grads = moe_layer.parameter_grads

    def wrong_router_gradient(layer):
        g = grads(layer)
        return {**g, "router": g["router"] * 1.01} if not isinstance(layer, moe_layer.GroupedMoE) else g

    monkeypatch.setattr(moe_layer, "parameter_grads", wrong_router_gradient)
    with pytest.raises(SystemExit, match=r"check failed: d32 D16 n8 k2 T256: grouped vs deepspeed router gradient"):
        moe_layer.main([*QUICK, "--out", str(tmp_path / "moe.json")])


def test_moe_layer_reports_out_of_memory_rows(tmp_path, monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(moe_layer, "gemm_step", out_of_memory)  # timing one variant
    rows = moe_layer.main([*QUICK, "--out", str(tmp_path / "moe.json")])["rows"]
    assert [r["note"] for r in rows if r["variant"] == "grouped_mm"] == ["out of memory (timing)"] * 2
    assert all(r["median_ms"] > 0 for r in rows if r["variant"] != "grouped_mm")
    build = moe_layer.build  # building one layer of the first shape: that shape's rows say so, the next is timed
    monkeypatch.setattr(moe_layer, "build", lambda b, shape, *a: out_of_memory() if shape == moe_layer.TINY[0] else build(b, shape, *a))
    rows = moe_layer.main([*QUICK, "--out", str(tmp_path / "moe.json")])["rows"]
    n = len(moe_layer.VARIANTS)
    assert [r["note"] for r in rows[:n]] == ["out of memory (the check: nothing timed)"] * n
    assert all(r["median_ms"] is None for r in rows[:n])
    assert all(r["median_ms"] > 0 for r in rows[n:] if r["variant"] != "grouped_mm")  # still out of memory


def test_train_step_pairs_erc_on_and_off_on_one_engine_and_times_a_checkpoint(tmp_path):
    out = tmp_path / "step.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), *QUICK, "--repeats", "3", "--no-profile",
                           "--checkpoint-dir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = read_result(out, train_step.COLUMNS)
    assert [c["check"] for c in result["checks"]] == [f"erc {arm}: every loss finite after 3 steps" for arm in ("off", "on")]
    assert all(3 < c["mean_lm_loss"] < 6 for c in result["checks"])  # about ln(128) on random tokens
    rows = result["rows"]
    assert [r["erc"] for r in rows] == [False, True]
    for r in rows:
        assert r["tokens_per_step"] == 8 * 32  # --tiny: global batch 8, seq_len 32
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["median_ms"] / 1e3))
        assert 0 < r["active_params_m"] < r["total_params_m"]  # top-2 of 8 experts
        assert r["mfu"] is None  # no peak FLOP/s for a CPU
    off, on = rows
    assert "erc_overhead" not in off and on["erc_overhead_p10"] <= on["erc_overhead"] <= on["erc_overhead_p90"]
    # the checkpoint: both saves wrote the same checkpoint (config and all), into the directory asked for, then removed it
    assert off["save_sync_held_s"] > 0 and off["save_async_held_s"] > 0 and off["save_async_write_s"] >= 0
    assert off["checkpoint_sync_mb"] == pytest.approx(off["checkpoint_async_mb"], rel=0.05) and off["checkpoint_sync_mb"] > 0.1
    assert [p.name for p in tmp_path.iterdir()] == ["step.json"]
    assert len(printed_table(proc.stdout, train_step.COLUMNS)) == 2


def test_train_step_stops_on_a_non_finite_loss():
    from ercstudy.trainables.step import Window

    cfg = train_step.trial_config(train_step.parser("x").parse_args(["--tiny"]), True, torch.float32)
    finite, broken = Window.empty(cfg, torch.device("cpu"), 0), Window.empty(cfg, torch.device("cpu"), 0)
    finite.steps = broken.steps = finite.micro_batches = broken.micro_batches = 2
    finite.losses[0] = broken.losses[0] = 9.0
    assert [c["passed"] for c in train_step.finite_loss_checks({False: finite})] == [True]
    broken.losses[4] = 1  # one non-finite micro-batch loss (train_step counts them)
    with pytest.raises(SystemExit, match="check failed: erc on: every loss finite after 2 steps"):
        train_step.finite_loss_checks({False: finite, True: broken})
    broken.losses[4], broken.losses[0] = 0, float("nan")
    with pytest.raises(SystemExit, match="check failed: erc on"):
        train_step.finite_loss_checks({True: broken})


def test_flops_per_token_counts_causal_attention():
    """6 x the active matmul parameters (LM head in, embedding lookup out) + causal attention, 6 * layers * d * T
    (QK^T and PV, 4 d T FLOPs a token and layer forward, x3 with backward, halved for the causal mask)."""
    from ercstudy.trainables.config import TrialConfig

    cfg = TrialConfig.from_dict({"model": {"vocab_size": 300, "d_model": 16, "n_layers": 3, "n_heads": 2, "seq_len": 64},
                                 "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 8}})
    d, L, T, V = 16, 3, 64, 300
    per_layer = 4 * d * d + 2 * d + 4 * d + 2 * 3 * d * 8  # attention, two norms, the router, two of four experts
    assert cfg.flops_per_token() == 6 * (L * per_layer + d + V * d) + 6 * L * d * T  # + the final norm and the LM head


# ---------------------------------------------------------------------------------------------
# bf16 paths against wider references: helpers that run on any device, checked here on CPU at small sizes and
# by the gpu-marked tests below on CUDA at benchmark sizes


def grouped_bf16_errors(shape, device: torch.device, monkeypatch) -> dict[str, float]:
    """GroupedMoE forward + backward in bf16 against the same layer in fp32 on the same (bf16-rounded) weights and
    tokens, routed to the experts the bf16 layer chose (routing is discrete: a rounded logit that picks another
    expert is not an arithmetic error). -> relative error in norm of the output and of each gradient."""
    import ercstudy.trainables.moe as moe
    from benchmarks.common import norm_rel_err

    d, D, n, k, tokens = shape
    gen = torch.Generator().manual_seed(0)
    weights = {name: w.bfloat16() for name, w in moe.random_expert_weights(n, d, D, std=0.02, out_std=0.02, generator=gen).items()}
    x = torch.randn(tokens, d, generator=gen).bfloat16()
    grad = torch.randn(tokens, d, generator=gen).bfloat16()

    def run(dtype):
        layer = moe.GroupedMoE(moe.MoEConfig(num_experts=n, top_k=k, expert_dim=D), d).to(device, dtype)
        layer.load_expert_weights({name: w.to(device, dtype) for name, w in weights.items()})
        xin = x.to(device, dtype, copy=True).requires_grad_()
        out, stats = layer(xin)
        out.backward(grad.to(device, dtype))
        got = {"output": out, "input gradient": xin.grad, "router gradient": layer.router.grad,
               "gate_up gradient": layer.experts.gate_up.grad, "down gradient": layer.experts.down.grad}
        assert all(t.dtype == dtype for t in got.values())
        return got, stats.experts_TK

    low, chosen_TK = run(torch.bfloat16)

    def same_experts(x_TD, router_ED, top_k, route=moe.route):
        r = route(x_TD, router_ED, top_k)
        weights_TK = r.probs_TE.gather(1, chosen_TK)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True) if top_k > 1 else weights_TK
        return moe.Routing(weights_TK, chosen_TK, r.probs_TE, r.logits_TE)

    with monkeypatch.context() as patch:
        patch.setattr(moe, "route", same_experts)
        ref, _ = run(torch.float32)
    return {what: norm_rel_err(low[what], want) for what, want in ref.items()}


BF16_GROUPED_TOLERANCE = 2e-2  # bf16 rounding of operands and results, relative to the fp32 computation, in norm


def test_grouped_bf16_against_fp32_on_cpu(monkeypatch):
    errors = grouped_bf16_errors((64, 32, 8, 2, 512), torch.device("cpu"), monkeypatch)
    assert max(errors.values()) <= BF16_GROUPED_TOLERANCE, errors


def test_erc_bf16_check_on_cpu():
    checks = erc_overhead.check_bf16(erc_overhead.TINY[0], torch.device("cpu"))
    assert [c["check"].split(": ", 2)[-1] for c in checks] == ["loss", "router gradient", "gate gradient"]
    assert all(c["passed"] for c in checks)


LEARN = """
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
device = torch.device(sys.argv[2])
if device.type == "cpu":
    os.environ["DS_ACCELERATOR"] = "cpu"
from benchmarks.train_step import init_single_process
from ercstudy.trainables.config import TrialConfig
from ercstudy.trainables.data import Batch
from ercstudy.trainables.engine import build_engine
from ercstudy.trainables.step import Trial, Window, train_step

steps, V, T = 8, 256, 32
init_single_process(device)
cfg = TrialConfig.from_dict({
    "model": {"vocab_size": V, "d_model": 64, "n_layers": 2, "n_heads": 2, "seq_len": T},
    "moe": {"num_experts": 8, "top_k": 2, "expert_dim": 32},
    "train": {"global_batch_size": 8, "micro_batch_size": 4, "precision": "bf16", "tokens": steps * 8 * T,
              "warmup_steps": 0, "report_every": 1, "checkpoint_every": 10**6},
    "data": {"num_domains": 1, "tokens_per_domain": 1, "shared_tokens": 0}, "eval": {"sequences": 0, "mc_items": 0}})

class OneBatch:  # the same 8 sequences every step: a loss that must fall as the model memorises them
    num_domains = 0
    def micro_batch(self, step, micro):
        tokens = torch.randint(0, V, (4, T + 1), generator=torch.Generator().manual_seed(micro))
        return Batch(tokens, torch.zeros(4, dtype=torch.long))

built = build_engine(cfg, device, rank=0)
trial = Trial(cfg, built.deepspeed, built.model, OneBatch(), device, 0, 1, built.ep_group, torch.Generator(device=device))
losses = []
for _ in range(steps):
    window = Window.empty(cfg, device, 0)
    trial.step += 1
    train_step(trial, window, measure_grad_norm=False)
    losses.append(window.losses[0].item() / window.micro_batches)
print(json.dumps({"losses": losses, "non_finite": window.losses[4].item(), "erc": window.losses[3].item(),
                  "dtypes": sorted({str(p.dtype) for p in built.model.parameters()})}))
"""


def bf16_training_losses(device: str) -> dict:
    """A few bf16 optimizer steps through build_engine and train_step (ERC on) in a fresh process on `device` (its
    DeepSpeed accelerator then is the device's: this test session's is the CPU one)."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", LEARN, str(ROOT), device], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_learns_in_bf16(result: dict) -> None:
    losses = result["losses"]
    assert all(math.isfinite(v) for v in [*losses, result["erc"]]) and result["non_finite"] == 0, result
    assert result["dtypes"] == ["torch.bfloat16"]  # the module DeepSpeed trains; its fp32 masters live in the optimizer
    assert losses[-1] < losses[0] - 0.3 and losses[-1] < min(losses[:-1]), losses  # (the first step runs at lr 0)


def test_bf16_training_steps_learn_on_cpu():
    assert_learns_in_bf16(bf16_training_losses("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_grouped_bf16_against_fp32_at_a_benchmark_shape(monkeypatch):
    """The 3B layer shape at 4k tokens on CUDA: bf16 grouped GEMMs (torch.nn.functional.grouped_mm) against the
    fp32 layer (CUDA's grouped_mm takes bf16 only: the fp32 reference runs the per-expert loop, with its warning)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        errors = grouped_bf16_errors((1536, 768, 64, 8, 4096), torch.device("cuda"), monkeypatch)
    assert max(errors.values()) <= BF16_GROUPED_TOLERANCE, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_erc_bf16_against_float64_at_the_3b_shape():
    checks = erc_overhead.check_bf16((12, 64, 1536, 768), torch.device("cuda"))
    assert len(checks) == 3 and all(c["passed"] for c in checks), checks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_training_steps_learn():
    assert_learns_in_bf16(bf16_training_losses("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_correctness_at_benchmark_sizes(tmp_path):
    """On a GPU, in bf16: the grouped layer against DeepSpeed-MoE at the benchmark's layer shapes, and
    erc_loss against the float64 per-layer pseudocode."""
    dev = torch.device("cuda")
    assert all(c["passed"] for c in erc_overhead.check((12, 64, 256, 128), dev))
    # the script as a user runs it: DeepSpeed on its CUDA accelerator (this test session's is the CPU one)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--device", "cuda", "--warmup", "0",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("cuda") and result["gpu"] and result["args"]["dtype"] is None  # bf16
    assert len(result["checks"]) == 6 * len(moe_layer.SHAPES)  # output, input and four parameter gradients
    assert all(c["passed"] and c["tolerance"] == 3e-2 for c in result["checks"])
    assert len(result["rows"]) == 4 * len(moe_layer.SHAPES)
    assert all(r["peak_mb_per_1k_tokens"] > 0 for r in result["rows"] if r["median_ms"] is not None)


def test_prepare_data_measures_the_pipeline_against_the_tokenizers_ceiling(tmp_path):
    result = prepare_data.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "prep.json")])
    assert json.loads((tmp_path / "prep.json").read_text())["columns"] == prepare_data.COLUMNS
    assert [c["passed"] for c in result["checks"]] == [True, True]  # every token written; the same shards from all four
    ceiling, ray1, ray2, one, two = result["rows"]
    assert [(r["what"], r["cpus"]) for r in result["rows"]] == [("ceiling", 1), ("ray", 1), ("ray", 2), ("process", 1), ("process", 2)]
    assert ceiling["of_ceiling"] == 1 and ray1["of_ceiling"] == pytest.approx(ray1["tokens_per_s"] / ceiling["tokens_per_s"])
    assert ray1["tokens"] == ray2["tokens"] == one["tokens"] == two["tokens"] > ceiling["tokens"]  # EOD tokens added
    assert ray2["vs_1_cpu"] == pytest.approx(ray2["tokens_per_s"] / ray1["tokens_per_s"])
    assert two["vs_1_cpu"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert ray1["ray_start_s"] > 0 and one["ray_start_s"] is None
    assert ray1["worker_peak_rss_mb"] > 50 and one["worker_peak_rss_mb"] is None  # Ray's workers, when there are
    assert all(50 < r["peak_rss_mb"] < 2000 for r in result["rows"])  # each process's own peak, not its parent's
