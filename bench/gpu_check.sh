#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one command for the minutes a GPU is at hand.
#
#   bash bench/gpu_check.sh [--out DIR]     on a machine with an NVIDIA GPU: its own python3
#                                           (CUDA torch, triton, transformers, safetensors),
#                                           no network, no Ray; under 8 minutes on one H100
#   bash bench/gpu_check.sh --dry-run       the same code on CPU with tiny shapes (CI)
#
# Writes gpu_check.json into --out (default: $OUT, else the current folder); the last line
# of output is the same JSON object. Python: $PYTHON if set, else .venv/bin/python for a dry
# run where it exists, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    PY=python3
    for arg in "$@"; do
        if [ "$arg" = "--dry-run" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
    done
fi
case " $* " in
    *" --dry-run "*) ;;
    *)  # the kernel test suite compiled on the GPU (the CPU runs it in Triton's interpreter)
        KERNEL_TESTS="not run (no pytest)"
        if "$PY" -c "import pytest" >/dev/null 2>&1; then
            if timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_tree.py \
                tests/test_kernels_attention.py tests/test_kernels_decode.py tests/test_kernels_ops.py >&2
            then KERNEL_TESTS=passed; else KERNEL_TESTS=failed; fi
        fi
        export KERNEL_TESTS ;;
esac
exec timeout 400 "$PY" bench/gpu_check.py "$@"
