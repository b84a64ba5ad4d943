#!/usr/bin/env bash
# Tree attention kernels on one GPU: kernel tests (compiled, fp32), bf16 checks
# against the torch reference, and timing against torch SDPA. Under 5 minutes on
# an H200 (tests at most 120 s, benchmark at most 170 s). The last line of output
# is a JSON object (see bench/gpu_tree_attention.py).
#
# Python: $PYTHON if set, else the first of .venv/bin/python, $BENCH_VENV/bin/python,
# python3 that has CUDA torch and triton; otherwise a venv at $BENCH_VENV (outside
# the repository) with torch==2.13.0 + triton + pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
BENCH_VENV="${BENCH_VENV:-$HOME/.cache/treespec-gpu-venv}"

fail() {
    echo "{\"bench\": \"gpu_tree_attention\", \"ok\": false, \"error\": \"$1\"}"
    exit 1
}
has_gpu_torch() {
    "$1" -c "import torch, triton; assert torch.cuda.is_available()" >/dev/null 2>&1
}

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || fail "no NVIDIA GPU visible (nvidia-smi -L)"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for cand in .venv/bin/python "$BENCH_VENV/bin/python" python3; do
        if command -v "$cand" >/dev/null 2>&1 && has_gpu_torch "$cand"; then PY="$cand"; break; fi
    done
fi
if [ -z "$PY" ]; then
    echo "no python with CUDA torch + triton found; installing into $BENCH_VENV" >&2
    # --system-site-packages reuses a system torch if one exists.
    python3 -m venv --system-site-packages "$BENCH_VENV" \
        && "$BENCH_VENV/bin/python" -m pip install -q "torch==2.13.0" triton pytest >&2
    PY="$BENCH_VENV/bin/python"
fi
has_gpu_torch "$PY" || fail "no CUDA torch + triton for $PY (pip install torch==2.13.0 triton)"
echo "python: $PY" >&2

# The kernel test suite on the GPU (the same tests the CPU runs in the interpreter).
GPU_TESTS="skipped (no pytest)"
if "$PY" -c "import pytest" >/dev/null 2>&1; then
    if timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_tree.py tests/test_kernels_attention.py >&2; then
        GPU_TESTS="passed"
    else
        GPU_TESTS="failed"
    fi
fi
export GPU_TESTS

timeout 170 "$PY" bench/gpu_tree_attention.py
rc=$?
if [ $rc -eq 124 ]; then
    echo "{\"bench\": \"gpu_tree_attention\", \"ok\": false, \"error\": \"timed out\", \"gpu_tests\": \"$GPU_TESTS\"}"
fi
[ "$GPU_TESTS" = "failed" ] && rc=1
exit $rc
