#!/usr/bin/env bash
# The GPU checks issue 6 still needs, as one prepared call for a lent GPU machine (python3 with
# PyTorch, torchvision, tensorboard, tqdm and pytest; no network), run from the repository root:
#   OUT=<folder for the results> bash docs/gpu_session.sh
# About 3 minutes on an H200 (178-187 s, 2026-11-27). BENCH_ARGS replaces the bench's arguments (default: the train
# section, --gpu-decode's rows included, and the matmul peak that its MFU needs; add --compile and
# more sections for the whole table, ~3 more minutes). Writes into $OUT (6 files): bench.json and the
# output of each step (bench_log.txt, profile.txt, gpu_tests.txt, demo_detector.txt, demo_pretrainer.txt).
set -u
OUT=${OUT:-runs/gpu_session}
BENCH_ARGS=${BENCH_ARGS:---only peak,train --time-budget 240}
RUNS=$(mktemp -d)          # the demo runs' folders (checkpoints): not in $OUT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.version.cuda)"
git log --oneline -1 2>/dev/null || true

# 1. bench.py: the train section, --gpu-decode's rows included (both warps, end to end).
timeout 300 python3 bench.py $BENCH_ARGS --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench_log.txt" | tail -40

# 2. Where --gpu-decode's classifier batch spends its time (decode, warps; host against device).
timeout 120 python3 docs/profile_gpu_decode.py cuda 2>&1 | tee "$OUT/profile.txt" | tail -45

# 3. The tests that need a GPU (nvJPEG batches, the batched warp, the side stream's hand-over, the
#    stem, the CUDA graph).
timeout 240 python3 -m pytest -q -rs tests/test_imagenet.py tests/test_bad_data.py tests/test_model.py \
    tests/test_bench.py tests/test_fast_pipeline.py -k "cuda or gpu_decode or graph" 2>&1 | tail -20 \
    | tee "$OUT/gpu_tests.txt"

# 4. Both training scripts end to end with --gpu-decode on the demo data (a few epochs each).
timeout 180 python3 train_detector.py --data demo --epochs 3 --gpu-decode --workers 4 --out-dir "$RUNS/det" \
    2>&1 | tail -15 | tee "$OUT/demo_detector.txt"
timeout 120 python3 pretrainer.py --data demo --epochs 3 --gpu-decode --workers 4 --out-dir "$RUNS/cls" \
    2>&1 | tail -10 | tee "$OUT/demo_pretrainer.txt"
rm -rf "$RUNS"
date -u
