#!/usr/bin/env bash
# The GPU check: one command for a GPU machine that has CuPy, Cython, pytest,
# hypothesis and torch but no network. Builds bncore in place, runs the GPU
# tests (real kernels against the CPU engine and the float64 oracle), runs the
# GPU benchmark and a profile of the host time per batch-norm call, and prints a
# short table last. Logs go to $OUT (or /tmp).
#     bash scripts/gpu_check.sh            # everything (about 2-3 minutes on an H200)
#     QUICK=1 bash scripts/gpu_check.sh    # fewer Hypothesis examples
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bncore-gpu-check}"
# the whole run stays within DEADLINE seconds (a device command is cut at 600 s and
# its output lost): each step's limit is capped by what is left, and a step with
# no time left is skipped (it says so), so the summary always prints
DEADLINE="${DEADLINE:-540}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0

echo "== device (at ${SECONDS} s)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import cupy, torch, numpy; p = cupy.cuda.runtime.getDeviceProperties(0); \
n = p['name'].decode() if isinstance(p['name'], bytes) else p['name']; \
print('cupy', cupy.__version__, '| torch', torch.__version__, '| numpy', numpy.__version__, \
'|', n, p['multiProcessorCount'], 'SMs')" || status=1

# Every step has a time limit (seconds; about twice what it takes on an H100), so
# that a kernel that hangs, e.g. at a grid barrier, cannot take the whole lease;
# a step that runs out says TIMED OUT, one with no time left says SKIPPED.
limited() {      # limited SECONDS NAME COMMAND...: run it; exit status 124 means out of time
    local secs=$1 name=$2; shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$secs" -gt "$left" ] && secs=$left
    if [ "$secs" -lt 10 ]; then
        echo "$name SKIPPED: ${left} s left of DEADLINE=${DEADLINE}" | tee -a "$SCRATCH/skipped.log" >&2
        return 124
    fi
    timeout -k 15 "$secs" "$@"
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "$name TIMED OUT after $secs s" | tee -a "$SCRATCH/skipped.log" >&2
        # the MPI tests start mpiexec in a session of its own (so that they can
        # kill a hung job whole), which timeout's signal to this step's process
        # group does not reach; the test kills it on SIGTERM, and should that not
        # happen (SIGKILL 15 s on), this checkout's ranks go here, lest they hold
        # the GPU through the steps after
        pkill -KILL -f "$PWD/tests/mpi_worker.py" 2>/dev/null || true
    fi
    return $rc
}

echo "== build (at ${SECONDS} s)"
# logs that need not come back stay in $SCRATCH: the device tool returns at most 8 files from $OUT
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
if ! limited 180 "build" $PY setup.py build_ext --inplace -j 16 > "$SCRATCH/build.log" 2>&1; then
    tail -40 "$SCRATCH/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import bncore; bncore.show_config()" || status=1

echo "== GPU tests (at ${SECONDS} s)"
export BNCORE_HYPOTHESIS_PROFILE="${QUICK:+dev}"
export BNCORE_HYPOTHESIS_PROFILE="${BNCORE_HYPOTHESIS_PROFILE:-ci}"
# the example's dataset: scikit-learn's digits; without scikit-learn, an .npz copy
# (x, y) at build/digits.npz if the caller brought one, else synthetic 8x8 images
DATASET=digits
if ! $PY -c "import sklearn" 2>/dev/null; then
    if [ -f build/digits.npz ]; then
        DATASET=build/digits.npz
    else
        DATASET="$SCRATCH/synthetic_digits.npz"
        $PY -c "import numpy as np; r = np.random.default_rng(0); p = r.uniform(0, 16, (10, 8, 8)); \
y = r.integers(0, 10, 1800); x = np.clip(p[y] + r.normal(0, 3, (1800, 8, 8)), 0, 16); \
np.savez('$DATASET', x=x.astype(np.float32), y=y)"
    fi
fi
export BNCORE_EXAMPLE_DATASET="$DATASET"
echo "example dataset: $DATASET"

# (faulthandler: a kernel that hangs dumps the stacks before the step's time runs out)
limited 240 "GPU tests" $PY -m pytest -q -rs --maxfail=5 -p no:cacheprovider \
    -o faulthandler_timeout=100 tests/test_gpu.py tests/test_gpu_import.py tests/test_gpu_interop.py \
    tests/test_gpu_distributed.py tests/test_distributed.py \
    "tests/test_registry_ops.py::test_gpu_matches_oracle_and_cpu" \
    tests/test_example_cnn.py -k "gpu and not cluster" 2>&1 | tee "$OUT/tests.log" | tail -25
test_rc=${PIPESTATUS[0]}
[ "$test_rc" -ne 0 ] && status=1
# pytest exits 0 when every test skips (no usable device, say): that is a failed check
no_pass() {      # no_pass LOG NAME: the log's summary line counts no passed test
    if ! tail -3 "$1" | grep -qE "[0-9]+ passed"; then
        echo "$2: NO TEST PASSED (all skipped?); see $1" | tee -a "$SCRATCH/skipped.log"
        return 0
    fi
    return 1
}
no_pass "$OUT/tests.log" "GPU tests" && status=1
# ... and so do the GPU tests when they skip for want of a device while the
# CPU-side tests of the same files pass
if grep -q "no usable GPU" "$OUT/tests.log"; then
    echo "GPU tests: SKIPPED for want of a usable GPU (see $OUT/tests.log)" | tee -a "$SCRATCH/skipped.log"
    status=1
fi

# the single-read cluster kernels' own tests (bncore_gpu/_bn_cluster_kernels.cu), on
# its own so that a failure there cannot stop the tests above
echo "== cluster kernel tests (at ${SECONDS} s)"
limited 90 "cluster tests" $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k cluster 2>&1 \
    | tee "$OUT/tests_cluster.log" | tail -8
[ "${PIPESTATUS[0]}" -ne 0 ] && status=1
no_pass "$OUT/tests_cluster.log" "cluster kernel tests" && status=1

echo "== bncore check --gpu (at ${SECONDS} s)"
limited 90 "bncore check --gpu" $PY -m bncore.cli check --gpu --json "$SCRATCH/check.json" \
    > "$OUT/check.log" 2>&1 \
    || { status=1; echo "bncore check --gpu FAILED"; }
grep -E " gpu |FAIL|checks on" "$OUT/check.log" | tail -40

if [ -f examples/train_cnn.py ] && [ -z "${SKIP_EXAMPLE:-}" ]; then
    echo "== example on the GPU (at ${SECONDS} s)"
    limited 120 "example" $PY examples/train_cnn.py --dataset "$DATASET" --device gpu --epochs 3 \
        --no-progress --compare-torch --compare-steps 20 \
        > "$OUT/example.log" 2>&1 || { status=1; echo "example FAILED"; }
    tail -12 "$OUT/example.log"
fi

echo "== GPU benchmark (at ${SECONDS} s)"
limited 240 "GPU benchmark" $PY scripts/bench.py --gpu --json "$OUT/bench_gpu.json" > "$OUT/bench.txt" 2> "$OUT/bench.err" \
    || { status=1; echo "GPU benchmark FAILED"; tail -30 "$OUT/bench.err"; }

echo "== host time per call (at ${SECONDS} s)"
limited 90 "host profile" $PY scripts/gpu_host_profile.py --channels-last > "$OUT/host_profile.txt" 2>&1 \
    || { status=1; echo "gpu_host_profile.py FAILED"; tail -20 "$OUT/host_profile.txt"; }

echo
echo "================ summary (${SECONDS} s) ================"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -2
grep -E "passed|failed|error" "$OUT/tests_cluster.log" | tail -1 | sed 's/^/cluster kernels: /'
if grep -qE "checks on|^PASS|^FAIL" "$OUT/check.log" 2>/dev/null; then
    grep -E "checks on|^PASS|^FAIL" "$OUT/check.log" | tail -2 | sed 's/^/bncore check --gpu: /'
else        # it did not get as far as a verdict (an import error, a crash)
    tail -3 "$OUT/check.log" 2>/dev/null | sed 's/^/bncore check --gpu (no verdict): /'
fi
grep -E "torch|steps" "$OUT/example.log" 2>/dev/null | tail -2 | sed 's/^/example: /'
cat "$SCRATCH/skipped.log" 2>/dev/null
# fallbacks taken (a cluster or cooperative launch refused) and the bench's own notes
grep -hE "RuntimeWarning|TIMED OUT|FAILED|^(3-kernel|3 kernels)[ ,]|native_batch_norm" \
    "$OUT/bench.err" "$OUT/tests.log" 2>/dev/null | sort -u | head -12
sed -n '/^host time per call/,$p' "$OUT/host_profile.txt"
echo
[ -s "$OUT/bench.txt" ] || echo "GPU benchmark: NO TABLE (see $OUT/bench.err)"
cat "$OUT/bench.txt" 2>/dev/null
exit $status
