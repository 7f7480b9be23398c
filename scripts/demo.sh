#!/usr/bin/env bash
# `make demo`: built-in corpus -> HDF5 shards -> GPT trained with Horovod on 2 MPI ranks in
# bf16 where it measured faster than fp32 on this CPU/GPU (a short matmul probe), else fp32 (`--precision
# auto`) -> a generated sample. Variables: VENV, DEMO_STEPS (800), DEMO_OUT (runs/demo),
# DEMO_DATA (data/stdlib), DEMO_MODEL (mini), DEMO_PRECISION (auto).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STEPS=${DEMO_STEPS:-800}
OUT=${DEMO_OUT:-runs/demo}
DATA=${DEMO_DATA:-data/stdlib}
hpcllm=("$VENV/bin/hpcllm")

echo "== 1/3 built-in corpus (Python standard library source) -> $DATA"
make --no-print-directory data OUT="$DATA"
"${hpcllm[@]}" inspect "$DATA"

PRECISION=${DEMO_PRECISION:-auto}
MODEL=${DEMO_MODEL:-mini}
echo "== 2/3 training GPT '$MODEL' with Horovod on 2 MPI ranks (precision $PRECISION, $STEPS steps)"
root=(); [ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
rm -rf "$OUT"
mpirun -np 2 "${root[@]}" --oversubscribe --bind-to none -x PATH -x OMP_NUM_THREADS=1 \
    "${hpcllm[@]}" train --data "$DATA" --out "$OUT" --model "$MODEL" \
    --seq-len 256 --micro-batch 8 --accum 1 --steps "$STEPS" --lr 2e-3 \
    --precision "$PRECISION" --log-every 50 --eval-every 200 --ckpt-every 200

echo "== 3/3 sample from the trained model"
"${hpcllm[@]}" generate "$OUT" --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 40 --seed 0
