#!/usr/bin/env bash
# Build, into one folder, every Python package a bare GPU machine lacks for the benchmarks and the gpu-marked
# tests: DeepSpeed as a pure-Python wheel (DS_BUILD_OPS=0: no op is compiled; none is used on the hot path) and
# what it and ercstudy's data plane import, as wheels for the machine's Python. Not Ray, MLflow or Optuna: the
# benchmarks and the engine run without them.
#
#     bash benchmarks/device/prepare.sh              # -> .whl/ for CPython 3.12 on x86-64 Linux (the GPU machine)
#     PYVER=3.11 bash benchmarks/device/prepare.sh /tmp/bundle   # for this machine's Python (the CPU twin's test)
#
# Versions are the ones installed here (what CI tests); the folder stays well under the 64 MiB a call carries.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-.whl}
PYVER=${PYVER:-3.12}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
rm -f "$OUT"/*.whl
version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }

# DeepSpeed builds from its sdist against this machine's torch; with no op built the wheel is py3-none-any
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$(version deepspeed)"

# DeepSpeed's and the data plane's imports (torch and numpy excepted: the machine's own CUDA build is the point)
PACKAGES=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions einops msgpack ninja
          packaging psutil py-cpuinfo tqdm pyyaml)
pins=()
for p in "${PACKAGES[@]}"; do pins+=("$p==$(version "$p")"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$OUT" "${pins[@]}"
wheels=("$OUT"/*.whl)
printf '  %s\n' "${wheels[@]##*/}"
echo "bundle: $OUT, $(du -sh "$OUT" | cut -f1) (${#wheels[@]} wheels, Python $PYVER)"
