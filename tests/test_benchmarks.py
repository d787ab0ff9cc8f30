"""The GPU benchmarks run end to end on CPU at tiny sizes: correctness checks first (recorded, and fatal when
they fail), then timings, the table and the JSON with its columns, units and device facts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import erc_overhead, moe_layer  # noqa: E402

QUICK = ["--device", "cpu", "--tiny", "--warmup", "0", "--repeats", "2"]


def read_result(path: Path, columns: list[str]) -> dict:
    """The JSON a benchmark wrote, after the checks every benchmark promises: CPU device facts, the columns, and
    every check passed within its tolerance."""
    result = json.loads(path.read_text())
    assert result["device"] == "cpu" and result["torch"] == torch.__version__ and result["cpu"] and result["date"]
    assert result["args"]["device"] == "cpu" and result["args"]["tiny"]
    assert result["columns"] == columns
    assert all(c["passed"] and c["max_rel_err"] <= c["tolerance"] for c in result["checks"]), result["checks"]
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
    columns = ["shape", "variant", "median_ms", "p10_ms", "p90_ms", "speedup_vs_pseudocode", "tflops", "peak_mb", "note"]
    saved = read_result(tmp_path / "erc.json", columns)
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


def test_erc_overhead_claims_no_speedup_when_the_baseline_does_not_fit(tmp_path, monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("pseudocode too large")

    monkeypatch.setattr(erc_overhead, "VARIANTS", {**erc_overhead.VARIANTS, "pseudocode": out_of_memory})
    monkeypatch.setattr(erc_overhead, "check", lambda shape, device: [])
    rows = erc_overhead.main([*QUICK, "--out", str(tmp_path / "erc.json")])["rows"]
    assert [r["note"] for r in rows if r["variant"] == "pseudocode"] == ["out of memory"] * 2
    assert all(r["speedup_vs_pseudocode"] is None and "no speedup" in r["note"] for r in rows if r["variant"] == "erc_loss")


def test_moe_layer_compares_the_backends(tmp_path, capsys):
    moe_layer.main([*QUICK, "--out", str(tmp_path / "moe.json")])
    result = read_result(tmp_path / "moe.json", moe_layer.COLUMNS)
    shapes = {f"d{d} D{D} n{n} k{k} T{t}": (d, D, n, k, t) for d, D, n, k, t in moe_layer.TINY}
    assert [c["check"] for c in result["checks"]] == [f"{s}: grouped vs deepspeed {what}" for s in shapes
                                                      for what in ("output", "input gradient")]
    assert all(c["tolerance"] == 1e-4 for c in result["checks"])  # fp32 on CPU
    rows = result["rows"]
    assert [(r["shape"], r["backend"]) for r in rows] == [(s, b) for s in shapes for b in ("grouped", "deepspeed")]
    for grouped, deepspeed in zip(rows[::2], rows[1::2]):
        d, D, n, k, tokens = shapes[grouped["shape"]]
        for r in (grouped, deepspeed):
            assert r["tflops"] == pytest.approx(3 * 3 * 2 * tokens * k * d * D / r["median_ms"] / 1e9)
            assert r["peak_mb_per_1k_tokens"] is None  # GPU only
        assert grouped["speedup_vs_deepspeed"] == pytest.approx(deepspeed["median_ms"] / grouped["median_ms"])
        assert "speedup_vs_deepspeed" not in deepspeed
    assert len(printed_table(capsys.readouterr().out, moe_layer.COLUMNS)) == len(rows)


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


def test_train_step_runs_the_real_step_with_erc_on_and_off(tmp_path):
    out = tmp_path / "step.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), *QUICK, "--no-profile", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    columns = ["erc", "active_params_m", "total_params_m", "tokens_per_step", "median_ms", "p10_ms", "p90_ms",
               "tokens_per_s", "mfu", "erc_overhead"]
    rows = read_result(out, columns)["rows"]
    assert [r["erc"] for r in rows] == [False, True]
    for r in rows:
        assert r["tokens_per_step"] == 8 * 32  # --tiny: global batch 8, seq_len 32
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["median_ms"] / 1e3))
        assert 0 < r["active_params_m"] < r["total_params_m"]  # top-2 of 8 experts
        assert r["mfu"] is None  # no peak FLOP/s for a CPU
    assert "erc_overhead" not in rows[0]
    assert rows[1]["erc_overhead"] == pytest.approx(rows[1]["median_ms"] / rows[0]["median_ms"] - 1)
    assert len(printed_table(proc.stdout, columns)) == 2


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
    assert len(result["checks"]) == 2 * len(moe_layer.SHAPES)
    assert all(c["passed"] and c["tolerance"] == 3e-2 for c in result["checks"])
    assert all(r["peak_mb_per_1k_tokens"] > 0 for r in result["rows"])
