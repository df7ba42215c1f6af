#!/usr/bin/env bash
# The CUDA part of benchmarks/compare.py on one GPU, in under 5 minutes on an H100/H200:
# full SD 1.4 architecture with random weights (built-in sd14-random), 512x512, PNDM 50 steps,
# CFG 7.5, fp16 + SDPA; the original's way, raw batched diffusers, `engine run` with
# batch_size auto (its measured size lands in the printed `engine batching` line), the
# noise_based sweep both ways, and the fraction of the physical limit.
#
#     bash benchmarks/gpu_check.sh [extra compare.py flags]       # from the repository root
#
# Copy the printed block into benchmarks/RESULTS.md with the GPU's name.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python}"

"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print("gpu:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
PY
nvidia-smi --query-gpu=name,memory.total,memory.used,utilization.gpu --format=csv,noheader || true

timeout 290 "$PYTHON" benchmarks/compare.py --preset cuda --engine-batch-size auto "$@"
