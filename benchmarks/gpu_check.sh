#!/usr/bin/env bash
# The GPU check: the LA development split at full resolution, SupervisedTrainer and VerSemiTrainer
# at an equal --time-budget with bf16 autocast and torch.compile, then prediction of the 20
# development test cases. Prints s/it, peak GPU memory, data-loader wait and Dice (the la_budget
# table) in under 9 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh [LA_H5_FOLDER] [OUT_FOLDER]
#
# LA_H5_FOLDER defaults to ../shared/data/la2018_h5. The machine needs this package's
# dependencies (pip install -e .) and a CUDA build of torch. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/la2018_h5}
OUT=${2:-benchmarks/_work/gpu_check}
MINUTES=${GPU_CHECK_MINUTES:-2.5}   # per trainer; conversion, planning and prediction take the rest
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__)"
start=$(date +%s)
"$PYTHON" benchmarks/la_budget.py --data "$DATA" --work "$OUT" --name gpu_check \
  --device cuda --compile --plan-network --spacing-scale 1 --minutes "$MINUTES" --seeds 0 \
  --parallel 1 --threads 8 --num-workers 4 --optimizer sgd --lr 0.01 --mirroring
echo "gpu_check: $(( $(date +%s) - start )) s in all; table in $OUT/gpu_check.md"
