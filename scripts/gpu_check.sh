#!/usr/bin/env bash
# One prepared run on a lent GPU machine (DESIGN.md §6): on-device parity tests of every pallas_gpu
# kernel, then the kernel bench tables (scripts/gpu_check.py). Logs and JSON go to $OUT.
#   device run: carry [".whl"] (fla-core, ml-collections wheels), command: bash scripts/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"
JAX_PLATFORMS=cuda timeout "${PARITY_TIMEOUT:-240}" python3 -m pytest -m gpu tests/pallas_kernels \
  -q -p no:cacheprovider -W ignore::DeprecationWarning 2>&1 | tee "$OUT/parity.log" | tail -60
timeout "${BENCH_TIMEOUT:-300}" python3 scripts/gpu_check.py --parts="${PARTS:-recurrence,retrieval,experts}" \
  --json="$OUT/gpu_check.json" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/bench.log"
