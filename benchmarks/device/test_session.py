"""The benchmarks' own check, outside the suite CI runs (about 65 s of a CI run's critical path, which is kept under
20 minutes): `python -m pytest benchmarks/device` before a GPU session. The GPU session runs on a bare machine in
one call: its CPU twin, a fresh virtualenv holding only what the GPU
machine is known to have of ours (torch, pytest, numpy, pyarrow) plus the bundle benchmarks/device/prepare.sh
builds, installed the same way, runs benchmarks/device/session.sh in its tiny CPU mode to the end, every part
writing its JSON."""

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/device/ -> the repository


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_session_script_runs_to_the_end_on_a_bare_cpu_twin(tmp_path):
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = tmp_path / "bundle"
    run(["bash", str(ROOT / "benchmarks/device/prepare.sh"), str(bundle)], env={**os.environ, "PYVER": pyver, "PYTHON": sys.executable})
    wheels = sorted(p.name for p in bundle.glob("*.whl"))
    assert any(w.startswith("deepspeed-") and w.endswith("py3-none-any.whl") for w in wheels), wheels
    assert not any(w.startswith(("ray-", "mlflow", "optuna", "torch-")) for w in wheels), wheels
    assert sum(p.stat().st_size for p in bundle.glob("*.whl")) < 32 * 2**20  # a call carries 64 MiB in all

    twin = tmp_path / "twin"
    venv.create(twin, with_pip=True)
    python = str(twin / "bin" / "python")
    versions = {name: __import__(name).__version__ for name in ("torch", "pytest", "numpy", "pyarrow")}
    run([python, "-m", "pip", "install", "-q", *(f"{n}=={v.split('+')[0]}" for n, v in versions.items())])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "DS_", "PYTEST"))}
    env.update(PATH=f"{twin / 'bin'}:{env['PATH']}", TINY="1", PYTHON=python, BUNDLE=str(bundle), OUT=str(tmp_path / "out"),
               SITE=str(tmp_path / "site"))
    session = run(["bash", str(ROOT / "benchmarks/device/session.sh")], env=env, cwd=tmp_path, timeout=600)
    assert "session: exit 0" in session.stdout, session.stdout[-3000:]
    out = tmp_path / "out"
    environment = json.loads((out / "environment.json").read_text())
    assert environment["device"] == "cpu" and environment["grouped_mm"]["runs"] and environment["sdpa"]["MATH"] == "runs"
    for part in ("moe_layer", "erc_overhead", "train_step"):
        result = json.loads((out / f"{part}.json").read_text())
        assert result["complete"] is True and result["rows"], part
    # every gpu-marked test was collected (none failed to import on the bare machine), and skips on a CPU
    summary = (out / "gpu-tests.log").read_text().strip().splitlines()[-1]
    assert re.match(r"\d+ skipped, \d+ deselected", summary) and int(summary.split()[0]) >= 8, summary
