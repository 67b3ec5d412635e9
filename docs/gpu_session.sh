#!/usr/bin/env bash
# The GPU checks issue 6 still needs, as one prepared call for a lent GPU machine (python3 with
# PyTorch, torchvision, tensorboard, tqdm and pytest; no network), run from the repository root:
#   OUT=<folder for the results> bash docs/gpu_session.sh
# About 7-9 minutes on an H100/H200 (the bench's own budget is 300 s; max-autotune is skipped).
# Writes into $OUT: bench.json and the output of each step (bench_log.txt, gpu_tests.txt, demo_*.txt).
set -u
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.version.cuda)"
git log --oneline -1 2>/dev/null || true

# 1. bench.py: every row, --gpu-decode's rows included (train section), with torch.compile.
timeout 420 python3 bench.py --compile --json "$OUT/bench.json" --time-budget 300 2>&1 | tee "$OUT/bench_log.txt"

# 2. The tests that need a GPU (nvJPEG batches, the side stream's hand-over, the stem, the CUDA graph).
timeout 240 python3 -m pytest -q -rs tests/test_imagenet.py tests/test_bad_data.py tests/test_model.py \
    tests/test_bench.py -k "cuda or gpu_decode or graph" 2>&1 | tail -20 | tee "$OUT/gpu_tests.txt"

# 3. Both training scripts end to end with --gpu-decode on the demo data (a few epochs each).
timeout 180 python3 train_detector.py --data demo --epochs 3 --gpu-decode --workers 4 --out-dir "$OUT/det" \
    2>&1 | tail -15 | tee "$OUT/demo_detector.txt"
timeout 120 python3 pretrainer.py --data demo --epochs 3 --gpu-decode --workers 4 --out-dir "$OUT/cls" \
    2>&1 | tail -10 | tee "$OUT/demo_pretrainer.txt"
date -u
