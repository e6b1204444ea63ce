#!/usr/bin/env bash
# Everything that needs a GPU, in one call: the CUDA tests, then benchmarks/gpu.py.
#
#   bash benchmarks/gpu_session.sh LOGDIR [gpu.py options ...]
#
# Logs go to LOGDIR (pytest.log, tests.log, gpu.log); the benchmark table is printed last.
# TEST_TIMEOUT and BENCH_TIMEOUT (seconds) bound the two stages; TEST_WORKERS sets
# pytest-xdist's worker count (0: no xdist; without pytest-xdist installed the tests run
# in one process), each worker on one CPU thread (15 workers at torch's default thread count
# timed out CPU-heavy tests). TESTS=all runs the whole suite instead of the CUDA test files.
# tests.log lists each test's outcome and failure as it happens, so a stage cut short by
# its timeout still says what failed (benchmarks/_pytest_live_log.py).
set -uo pipefail
cd "$(dirname "$0")/.."
log="${1:?usage: gpu_session.sh LOGDIR [gpu.py options]}"
shift
mkdir -p "$log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"

# pyproject's addopts asks pytest-xdist for one worker per core: set the count here, or
# clear the option where xdist is missing
if python3 -c "import xdist" 2>/dev/null; then
    workers=(-n "${TEST_WORKERS:-8}")
else
    workers=(-o "addopts=")
    [ "${TEST_WORKERS:-8}" != 0 ] && echo "pytest-xdist is not installed: the tests run in one process"
fi
files=(tests/test_kernels_strided_bmm.py tests/test_kernels_slot_rows.py tests/test_gpu_route.py
       tests/test_moe.py)
[ "${TESTS:-cuda}" = all ] && files=(tests)
start=$(date +%s)
rm -f "$log/tests.log"  # a stale log would be read as this run's
OMP_NUM_THREADS=1 LIVE_LOG="$log/tests.log" PYTHONPATH="$PYTHONPATH:$PWD/benchmarks" \
    timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -p no:cacheprovider -p _pytest_live_log \
    "${workers[@]}" --tb=short "${files[@]}" >"$log/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"
if [ -s "$log/tests.log" ]; then
    grep -E "^(FAILED|ERROR) " "$log/tests.log" | cut -c1-200 | head -40
    echo "$(grep -c '^PASSED ' "$log/tests.log") passed, $(grep -c '^FAILED ' "$log/tests.log")" \
         "failed, $(grep -c '^ERROR ' "$log/tests.log") errors," \
         "$(grep -c '^SKIPPED ' "$log/tests.log") skipped (tests.log)"
else  # pytest stopped before its session started: its own output says why
    tail -20 "$log/pytest.log"
fi

timeout "${BENCH_TIMEOUT:-250}" python3 benchmarks/gpu.py "$@" 2>&1 | tee "$log/gpu.log"
