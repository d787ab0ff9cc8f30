"""The GPU benchmarks run end to end on CPU at tiny sizes: correctness check first, then timings, table and JSON."""

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

QUICK = ["--tiny", "--warmup", "0", "--repeats", "2"]


def test_erc_overhead_checks_then_times_every_variant(tmp_path):
    result = erc_overhead.main([*QUICK, "--out", str(tmp_path / "erc.json")])
    rows = json.loads((tmp_path / "erc.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    assert {(r["shape"], r["variant"]) for r in rows} == {(s, v) for s in ("L2 n8 d32 D16", "L3 n16 d24 D8") for v in ("pseudocode", "batched")}
    assert all(r["median_ms"] > 0 and r["speedup_vs_pseudocode"] > 0 for r in rows)


def test_erc_variants_agree_with_the_reference():
    router, gate, noise = erc_overhead.make_inputs((3, 6, 10, 4), torch.device("cpu"), torch.float64)
    loss, m = erc_overhead.batched(router, gate, noise, 0.7, torch.float64)
    from ercstudy.trainables.erc import coupling_activations, erc_from_activations

    proxies = router * (1 + erc_overhead.noise_bound(router)[..., None] * (2 * noise - 1))
    assert torch.allclose(m, coupling_activations(proxies, gate).double())
    assert torch.allclose(loss, erc_from_activations(m, 0.7))
    assert torch.allclose(erc_overhead.pseudocode(router, gate, noise, 0.7).double(), loss, rtol=1e-5)


def test_moe_layer_compares_the_backends(tmp_path):
    moe_layer.main([*QUICK, "--out", str(tmp_path / "moe.json")])
    result = json.loads((tmp_path / "moe.json").read_text())
    assert [r["backend"] for r in result["rows"]] == ["grouped", "deepspeed"] * 2
    assert all(r["max_rel_err"] < 1e-4 and r["tflops"] > 0 for r in result["rows"])
    assert result["rows"][0]["speedup_vs_deepspeed"] > 0 and result["device"] == "cpu" and "date" in result


def test_train_step_runs_the_real_step_with_erc_on_and_off(tmp_path):
    out = tmp_path / "step.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), *QUICK, "--no-profile", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["erc"] for r in rows] == [False, True]
    assert all(r["tokens_per_s"] > 0 for r in rows) and "erc_overhead" in rows[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_correctness_at_benchmark_sizes():
    """On a GPU, in bf16: the grouped layer against DeepSpeed-MoE at the paper's layer shape, and the
    batched ERC loss (fp32 and bf16 operands) against the float64 per-layer pseudocode."""
    dev = torch.device("cuda")
    erc_overhead.check((12, 64, 256, 128), dev)
    router, gate, noise = erc_overhead.make_inputs((12, 64, 1536, 768), dev, torch.float32)
    with torch.no_grad():
        m32 = erc_overhead.batched(router, gate, noise, 1.0)[1]
        m16 = erc_overhead.batched(router, gate, noise, 1.0, torch.bfloat16)[1]
    assert ((m16 - m32).abs().max() / m32.abs().max()).item() < 1e-2
    moe_layer.main(["--device", "cuda", "--warmup", "0", "--repeats", "1", "--out", "/tmp/moe_gpu_check.json"])
