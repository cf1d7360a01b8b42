#!/usr/bin/env bash
# Train catbatch-shapes on one CUDA GPU within a time budget, export it and evaluate it on 500
# held-out captions. Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_train_shapes.sh [TRAIN_SECONDS]        # default 360
#
# Needs python3 with torch (CUDA), transformers, numpy, scipy, pillow, safetensors,
# sentencepiece and protobuf, plus diffusers 0.42: wheels in .whl/ are installed first
# (python3 -m pip download --no-deps diffusers==0.42.1 -d .whl). Imports no Ray, pydantic or
# open_clip. Writes into $OUT (default out/gpu-shapes), at most 7 files of < 16 MiB:
#   train.log, eval.log       progress (loss, steps/s, layout probe, evaluations) and the result
#   catbatch-shapes.tar       the exported pipeline folder (EMA weights, fp16)
#   catbatch-shapes.pt.part-* the training checkpoint in pieces: cat them to resume on a CPU
#   preview.png, grid.png     images of the last in-training evaluation and of the final one
# A CPU smoke test of the same path (not for numbers):
#   DEVICE=cpu DTYPE=fp32 BATCH=4 HIGH_BATCH=2 LOG_EVERY=5 EVAL_EVERY=10 EVAL_COUNT=4 FINAL_COUNT=4 \
#       OUT=/tmp/gpu-smoke bash scripts/gpu_train_shapes.sh 40
set -euo pipefail
BUDGET=${1:-360}
OUT=${OUT:-out/gpu-shapes}
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bf16} BATCH=${BATCH:-512} HIGH_BATCH=${HIGH_BATCH:-128}
EVAL_EVERY=${EVAL_EVERY:-1500} EVAL_COUNT=${EVAL_COUNT:-128} FINAL_COUNT=${FINAL_COUNT:-500}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
pack() {  # whatever training left, also when it failed: the export as a tar, the checkpoint in pieces
    if [ -d "$WORK/catbatch-shapes" ] && [ ! -f "$OUT/catbatch-shapes.tar" ]; then
        tar -C "$WORK" -cf "$OUT/catbatch-shapes.tar" catbatch-shapes
    fi
    if [ -f "$WORK/catbatch-shapes.pt" ] && ! compgen -G "$OUT/catbatch-shapes.pt.part-*" > /dev/null; then
        split -b 15m "$WORK/catbatch-shapes.pt" "$OUT/catbatch-shapes.pt.part-"
    fi
}
trap pack EXIT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2> /dev/null || true

python3 -m catbatch.shapes.train --device "$DEVICE" --dtype "$DTYPE" --steps auto \
    --time-budget "$BUDGET" --reserve 15 --batch "$BATCH" --high-batch "$HIGH_BATCH" \
    --high-from 0.85 --lr 8e-4 --final-lr 8e-5 --warmup 500 --ema 0.999 --log-every "${LOG_EVERY:-250}" \
    --eval-every "$EVAL_EVERY" --eval-count "$EVAL_COUNT" --preview "$OUT/preview.png" \
    --checkpoint-every 120 --checkpoint "$WORK/catbatch-shapes.pt" --out "$WORK/catbatch-shapes" \
    2>&1 | tee "$OUT/train.log"
pack

python3 -m catbatch.shapes.evaluate --model "$WORK/catbatch-shapes" --device "$DEVICE" \
    --workers 1 --count "$FINAL_COUNT" --batch 250 --grid "$OUT/grid.png" 2>&1 | tee "$OUT/eval.log"
ls -l "$OUT"
