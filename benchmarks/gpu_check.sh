#!/usr/bin/env bash
# The GPU check: the LA development split at full resolution, SupervisedTrainer and VerSemiTrainer
# (its semi-supervised method from the first step, so the GPU runs every part of its step) at an
# equal --time-budget with bf16 autocast and torch.compile, then prediction of the 20
# development test cases. Prints s/it, peak GPU memory, data-loader wait and Dice (the la_budget
# table) in under 9 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh [LA_H5_FOLDER] [OUT_FOLDER]
#
# LA_H5_FOLDER defaults to ../shared/data/la2018_h5. The machine needs this package's
# dependencies (pip install -e .) and a CUDA build of torch. Not part of CI. A shortened train.list
# (a subset of the scans, e.g. where only a few can be copied to the GPU machine) needs
# GPU_CHECK_TEST_CASES, the number of its last ids held out as test cases (default 20);
# benchmarks/la_h5_subset.py packs such a subset losslessly into one file (8 labeled + 3 unlabeled
# + 3 test cases: 22 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/la2018_h5}
OUT=${2:-benchmarks/_work/gpu_check}
MINUTES=${GPU_CHECK_MINUTES:-2.5}   # per trainer; conversion, planning and prediction take the rest
TEST_CASES=${GPU_CHECK_TEST_CASES:-20}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__)"
start=$(date +%s)
"$PYTHON" benchmarks/la_budget.py --data "$DATA" --work "$OUT" --name gpu_check \
  --device cuda --compile --plan-network --spacing-scale 1 --minutes "$MINUTES" --seeds 0 --test-cases "$TEST_CASES" \
  --parallel 1 --threads 8 --num-workers 4 --optimizer sgd --lr 0.01 --mirroring \
  --variant '{"label": "Supervised", "trainer": "SupervisedTrainer"}' \
  --variant '{"label": "VerSemi no warm-up", "trainer": "VerSemiTrainer", "args": ["--supervised-warm-up", "0"]}'
echo "gpu_check: $(( $(date +%s) - start )) s in all; table in $OUT/gpu_check.md"
