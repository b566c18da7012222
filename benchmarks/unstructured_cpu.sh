#!/usr/bin/env bash
# Issue 20's measurements on CPU: the unstructured sparse route against dense and SparseProp, 1 and 2 threads.
# Layer training steps (forward + dX + dW) and whole LeNet-300-100 steps (SGD and Adam), every JSON and PNG under
# benchmarks/results/unstructured/ (tagged with the thread count), then the step under load. Needs sparseprop
# (`make bench-deps`); without it its rows say "skipped". Run on an otherwise idle machine: ~15 minutes on 2 cores.
#   bash benchmarks/unstructured_cpu.sh [THREADS...]     (default: 1 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/unstructured
mkdir -p "$OUT"
threads=("$@"); [ ${#threads[@]} -eq 0 ] && threads=(1 2)
common=(--mode train --repeats 5 --min-run-time 0.2 --device cpu --out "$OUT" --force)
for t in "${threads[@]}"; do
  $PY -m lthfast bench layer --kind linear --shape 1024x1024 --tokens 256 --sparsity 0,0.5,0.9,0.95,0.98,0.99 --block 1,32 \
      --providers dense,lthfast,sparseprop --threads "$t" --tag "1024-${t}thread" "${common[@]}"
  $PY -m lthfast bench layer --kind linear --shape 300x784 --tokens 60 --sparsity 0,0.5,0.9,0.95,0.98,0.99 --block 1 \
      --providers dense,lthfast,sparseprop --threads "$t" --tag "lenet-${t}thread" "${common[@]}"
  for hw in 8x8 16x16; do
    $PY -m lthfast bench layer --kind conv --shape 64x64x3x3 --batch 64 --image "$hw" \
        --sparsity 0,0.5,0.9,0.95,0.98,0.99 --block 1 --providers dense,lthfast,sparseprop,sparseprop-width \
        --threads "$t" \
        --tag "$hw-${t}thread" "${common[@]}"
  done
  for opt in sgd adam; do
    $PY -m lthfast bench train --model lenet300 --batch 60 --optimizer "$opt" --sparsity 0,0.5,0.9,0.98 --block 1 \
        --providers dense,lthfast,sparseprop --threads "$t" --repeats 5 --device cpu --out "$OUT" --force \
        --tag "$opt-${t}thread"
  done
done
$PY benchmarks/step_under_load.py --out "$OUT/step_under_load.json" --force
