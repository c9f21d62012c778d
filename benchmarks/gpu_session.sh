#!/usr/bin/env bash
# The GPU session, as one script for a machine with a CUDA GPU (the project's GPU machine has one
# H200 with torch and Lightning, but may lack torchrec, fbgemm, wandb, pytest and jsonargparse, and
# cannot reach the network):
#   1. the acceptance run (benchmarks/gpu_acceptance.py: parity with the CPU, bf16 / 16-mixed,
#      16-mixed + skip on a NaN batch, host syncs per step, CUDA-event phase times against the
#      monitor's, sync/async save + resume + convert on a CPU-only process, compressors on CUDA,
#      loss memory against the estimate, block TFLOP/s, tables when torchrec is there), each step
#      in its own process with a time limit, JSON under $OUT/acceptance/;
#   2. the tier-3 tests (tests/test_gpu.py) when pytest is installed;
#   3. the headline benchmark's GPU variant (one GPU: single-device samples/s and MFU).
#
#   bash benchmarks/gpu_session.sh             # on the GPU machine, ~10 minutes; results in $OUT
#   bash benchmarks/gpu_session.sh --dry-run   # CPU only: the acceptance run's plumbing (CI runs this)
#
# A failing step does not stop the next one; the exit status is the acceptance run's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the project's virtualenv when there is one (make install), else the machine's python
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python || command -v python3); fi
fi

if [ "${1:-}" = "--dry-run" ]; then
  echo "== acceptance run, dry (CPU, tiny)"
  timeout 900 "$PY" benchmarks/gpu_acceptance.py --dry-run --out "$OUT"
  exit $?
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu_info.txt"

echo "== acceptance run"
timeout 480 "$PY" benchmarks/gpu_acceptance.py --out "$OUT"
status=$?

if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== tier-3 tests"
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
else
  echo "== tier-3 tests: pytest is not installed here (the acceptance run covers the same checks)"
fi

echo "== hybrid vs single, GPU variant"
timeout 150 "$PY" benchmarks/hybrid_vs_single.py --accelerator gpu --out "$OUT/hybrid_vs_single_gpu.json" 2>&1 | tail -12
exit $status
