#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with a CUDA GPU (the project's GPU machine has
# one H200 with torch and Lightning, but no torchrec, fbgemm, wandb or jsonargparse): the tier-3
# tests, the transformer block's TFLOP/s, and the headline benchmark's GPU variant (with one GPU:
# the single-device samples/s and MFU; with several: every layout up to P = 8).
#
#   bash benchmarks/gpu_session.sh            # results in $OUT (default: benchmarks/results)
#
# About 5 minutes on an H200. Each step has its own time limit, and a failing step does not stop
# the next one.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu_info.txt"
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" 2>&1 | tee -a "$OUT/gpu_info.txt"

echo "== tier-3 tests"
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"

echo "== transformer block TFLOP/s"
timeout 180 python benchmarks/gpu_block_tflops.py --out "$OUT/gpu_block_tflops.json" 2>&1 | tail -10

echo "== hybrid vs single, GPU variant"
timeout 300 python benchmarks/hybrid_vs_single.py --accelerator gpu --out "$OUT/hybrid_vs_single_gpu.json" 2>&1 | tail -12
