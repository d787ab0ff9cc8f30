#!/usr/bin/env bash
# One GPU session, checks first: the gpu-marked tests, then the three benchmarks (bf16), each under a timeout,
# each writing its JSON under benchmarks/results/. Run from the repository root on a machine with a CUDA GPU:
#
#     bash benchmarks/gpu_session.sh                  # LAYERS=12 for the target's 12-layer step, if it fits
#
# Timeouts (seconds) can be overridden: TEST_TIMEOUT, MOE_TIMEOUT, ERC_TIMEOUT, STEP_TIMEOUT. A failed or timed-out
# part is reported and the next one still runs; the exit status is that of the first failure.
set -u
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
unset DS_ACCELERATOR  # DeepSpeed picks the CUDA accelerator (tests/conftest.py sets cpu for its own process only)
status=0

part() {  # part NAME TIMEOUT COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (timeout ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=30 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
part gpu-tests "${TEST_TIMEOUT:-900}" python -m pytest -q -m gpu tests/benchmarks/test_benchmarks.py
part moe_layer "${MOE_TIMEOUT:-600}" python benchmarks/moe_layer.py --out "$OUT/moe_layer-cuda.json"
part erc_overhead "${ERC_TIMEOUT:-600}" python benchmarks/erc_overhead.py --out "$OUT/erc_overhead-cuda.json"
part train_step "${STEP_TIMEOUT:-900}" python benchmarks/train_step.py --layers "${LAYERS:-6}" --out "$OUT/train_step-cuda.json"
exit "$status"
