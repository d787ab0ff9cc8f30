#!/usr/bin/env bash
# One device call does it all, on a bare GPU machine (python3 with a CUDA torch, pytest, numpy, pyarrow; no network):
# install the bundle that prepare.sh built, then each part under its own budget, each writing its JSON under $OUT as
# soon as it ends, so that a call cut off still returns what it measured. Under 8 minutes in all.
#
#     bash benchmarks/device/prepare.sh                       # here, once: .whl/ (ignored; carry it)
#     OUT=$OUT bash benchmarks/device/session.sh              # there: the device call's command, carry [".whl"]
#     TINY=1 bash benchmarks/device/session.sh                # a CPU machine: tiny shapes, end to end (tests)
#
# Parts (budget in seconds, override with <PART>_S): environment 30, gpu-tests 120, moe_layer 90, erc_overhead 60,
# train_step 150 (the paper's 3B layer shape, 6 layers, with its profile). A failed or timed-out part is reported
# and the next one runs; the exit status is that of the first failure.
set -u
cd "$(dirname "$0")/../.." || exit
OUT=${OUT:-benchmarks/results}
BUNDLE=${BUNDLE:-.whl}
SITE=${SITE:-/tmp/ercstudy-site}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$BUNDLE"/*.whl \
  || { echo "session: the bundle in $BUNDLE did not install (run benchmarks/device/prepare.sh here first)"; exit 3; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset DS_ACCELERATOR  # DeepSpeed picks the CUDA accelerator (tests/conftest.py sets cpu for its own process only)
if [ "${TINY:-0}" = 1 ] || ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  DEVICE=(--device cpu)
  SIZE=(--tiny "${DEVICE[@]}" --warmup 0 --repeats 2)
  export DS_ACCELERATOR=cpu
else
  DEVICE=()
  SIZE=()
fi
status=0

part() {  # part NAME BUDGET COMMAND...: its output to $OUT/NAME.log, its JSON written by the command itself
  local name=$1 budget=$2
  shift 2
  echo "=== $name (budget ${budget}s): $*"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

part environment "${ENVIRONMENT_S:-30}" "$PY" benchmarks/device/environment.py --out "$OUT/environment.json" "${DEVICE[@]}"
part gpu-tests "${GPU_TESTS_S:-120}" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/benchmarks/test_benchmarks.py tests/trainables/test_step.py tests/trainables/test_engine.py tests/trainables/test_moe.py \
  --junitxml "$OUT/gpu-tests.xml"
part moe_layer "${MOE_LAYER_S:-90}" "$PY" benchmarks/moe_layer.py "${SIZE[@]}" --out "$OUT/moe_layer.json"
part erc_overhead "${ERC_OVERHEAD_S:-60}" "$PY" benchmarks/erc_overhead.py "${SIZE[@]}" --out "$OUT/erc_overhead.json"
part train_step "${TRAIN_STEP_S:-150}" "$PY" benchmarks/train_step.py "${SIZE[@]}" --layers "${LAYERS:-6}" \
  --out "$OUT/train_step.json"
echo "session: exit $status; results in $OUT"
exit "$status"
