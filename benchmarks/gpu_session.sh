#!/usr/bin/env bash
# Everything that needs a GPU, in one call: the CUDA tests, then benchmarks/gpu.py.
#
#   bash benchmarks/gpu_session.sh LOGDIR [gpu.py options ...]
#
# Logs go to LOGDIR (pytest.log, gpu.log); the benchmark table is printed last.
# TEST_TIMEOUT and BENCH_TIMEOUT (seconds) bound the two stages; TEST_WORKERS sets
# pytest-xdist's worker count (0: no xdist; without pytest-xdist installed the tests run
# in one process).
set -uo pipefail
cd "$(dirname "$0")/.."
log="${1:?usage: gpu_session.sh LOGDIR [gpu.py options]}"
shift
mkdir -p "$log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"

workers=()
if [ "${TEST_WORKERS:-8}" != 0 ]; then
    if python3 -c "import xdist" 2>/dev/null; then
        workers=(-n "${TEST_WORKERS:-8}")
    else
        echo "pytest-xdist is not installed: the tests run in one process"
    fi
fi
start=$(date +%s)
timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -p no:cacheprovider "${workers[@]}" --tb=short \
    tests/test_kernels_strided_bmm.py tests/test_kernels_slot_rows.py tests/test_gpu_route.py \
    tests/test_moe.py >"$log/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"
grep -E "^(FAILED|ERROR)" "$log/pytest.log" | head -40
tail -1 "$log/pytest.log"

timeout "${BENCH_TIMEOUT:-250}" python3 benchmarks/gpu.py "$@" 2>&1 | tee "$log/gpu.log"
