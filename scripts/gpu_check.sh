#!/usr/bin/env bash
# One prepared run on a lent GPU machine (docs/design.md, "Adding a kernel op"): on-device parity
# tests of the pallas_gpu kernels (`-m gpu`, optionally narrowed with PARITY_K), then the kernel
# bench tables (scripts/gpu_check.py), each part in its own process and time limit, rows printed as
# they finish.
# Logs and JSON go to $OUT.  Device run: carry [".whl"] (fla-core wheel), bash scripts/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
if [ "${PARITY_TIMEOUT:-240}" -gt 0 ]; then
  JAX_PLATFORMS=cuda timeout "${PARITY_TIMEOUT:-240}" python3 -m pytest -m gpu tests/pallas_kernels \
    -k "${PARITY_K:-}" -q -p no:cacheprovider -W ignore::DeprecationWarning -rA --durations=5 \
    2>&1 | tee "$OUT/parity.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|^E .*Error" | cut -c1-300
fi
for spec in ${PARTS:-retrieval,experts:150 recurrence:300}; do   # parts:timeout_s
  part=${spec%%:*}; limit=${spec##*:}
  echo "== $part (limit ${limit}s)"
  timeout "$limit" python3 scripts/gpu_check.py --parts="$part" --json="$OUT/${part//,/_}.json" \
    2>&1 | grep -v "Warning\|warn(" | tee "$OUT/${part//,/_}.log" | cut -c1-400
done
