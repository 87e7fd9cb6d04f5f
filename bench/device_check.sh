#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200, torch 2.11+cu130, triton 3.6, Python 3.12, no network):
#   build fusedlora._C for sm_90 only, assert it loaded, run the `gpu` tests (none may skip), run the
#   benchmark matrix, print a short table last. Everything lands under $OUT (at most 8 files come back).
# Bitsandbytes is not on that machine: carry its wheel in .whl/ (see bench/README.md) for the bnb baselines.
# Budget: under 5 minutes. Each stage has its own timeout so one slow stage cannot eat the others; the
# limits add up to 270 s (build 90, tests 60, cut-overs 35, layer 40, decode 20, dequant 10, step 15).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
LOGS=$(mktemp -d)  # per-stage files; only a few come back (the device returns at most 8 files from $OUT)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# fusedlora is built in place, not installed: `python bench/X.py` puts bench/ first on the path, not the root
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
stage() { echo "=== [$(( $(date +%s) - t0 ))s] $*"; }
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
  stage "installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage "build fusedlora._C for sm_90 (MAX_JOBS=16)"
if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 90 $PY setup.py build_ext --inplace >"$LOGS/build.log" 2>&1; then
  cp "$LOGS/build.log" "$OUT/"; tail -40 "$LOGS/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -i "spill" "$LOGS/build.log" | grep -v " 0 bytes spill" | head -5
$PY -m fusedlora.cli info | tee "$OUT/info.txt"
# one interpreter (torch imported once): the commit the results will name, then whether the extension loaded
$PY -c "import fusedlora, sys; from fusedlora.bench.results import commit; print('results will name commit', commit()); sys.exit(0 if fusedlora.extension_loaded() else 'fusedlora._C did not load: ' + str(fusedlora._ext.EXTENSION_ERROR))" | tee -a "$OUT/info.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

stage "gpu tests (none may be skipped)"
# Several workers: most of this stage is Triton compiling kernels, one CPU core per compile.
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
# A test stuck on the GPU (a kernel that never ends) is stopped after 30 s with its stack in the log, where
# pytest-timeout is installed, instead of taking the stage down with it unnamed.
PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 30 --timeout-method thread")
FUSEDLORA_REQUIRE_GPU=1 timeout 60 $PY -m pytest -q -m gpu -rfEs -p no:cacheprovider $XDIST $PER_TEST tests \
  >"$OUT/gpu_tests.log" 2>&1
rc=$?
tail -25 "$OUT/gpu_tests.log"
if [ $rc -ne 0 ]; then echo "GPU TESTS FAILED (rc=$rc)"; status=1; fi
if grep -qE "[0-9]+ skipped" "$OUT/gpu_tests.log"; then echo "GPU TESTS SKIPPED SOME"; status=1; fi

stage "cut-overs of the 4-bit training paths (measured, written for fusedlora/ops/cutovers.json)"
timeout 35 $PY bench/bench_cutover.py --budget 25 --out "$OUT/cutovers.json" >"$LOGS/cutover.log" 2>&1 \
  || { echo "cut-over bench failed or ran out of time"; status=1; }
grep -E "^cutover" "$LOGS/cutover.log" | tail -n 30
cat "$LOGS/cutover.log" >>"$OUT/bench.log"

stage "benchmarks"
# name, time limit (s), arguments: the limits are part of the 270 s above
run_bench() {
  local name=$1 limit=$2; shift 2
  echo "--- $name" >>"$OUT/bench.log"
  timeout "$limit" $PY "bench/$name.py" --out "$LOGS/$name.json" "$@" >>"$OUT/bench.log" 2>&1 \
    || { echo "$name failed or ran out of time (see bench.log)"; status=1; }
}
run_bench bench_layer 40 --budget 28
run_bench bench_decode 20 --budget 12
run_bench bench_dequant 10 --budget 5
run_bench bench_step 15 --quick --budget 10
$PY bench/merge_results.py "$LOGS"/bench_*.json --out "$OUT/results.json" >"$OUT/table.md" 2>&1 || status=1

stage "summary"
cat "$OUT/table.md"
echo "device_check status: $status  ($(( $(date +%s) - t0 ))s)"
exit $status
