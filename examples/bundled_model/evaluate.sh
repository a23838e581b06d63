#!/usr/bin/env bash
# The model card's comparison: hard-mask vs evotoken (training-free) vs evotoken after CTS vs the plain-SFT
# FT-baseline (same extra steps) vs d2f after D2F distillation, at NFE = gen/1, gen/2, gen/4, with the
# alpha sweep. Usage: bash examples/bundled_model/evaluate.sh RUNS_DIR [LIMIT]
set -euo pipefail
runs=${1:-runs/bundled}
limit=${2:-200}
base="$runs/base"
out="$runs/eval"
common=(sudoku4 arith countdown3 --limit "$limit" --batch-size 50 --gen-length 48 --block-length 16)
for steps in 48 24 12; do
  evotok bench "${common[@]}" -m "$base" -d hard-mask -d evotoken --sweep alpha=0.5,0.7,0.9 \
      --steps "$steps" --out "$out/base-nfe$steps"
  evotok bench "${common[@]}" -m "$base" --adapter "$runs/cts" -d hard-mask -d evotoken \
      --sweep alpha=0.5,0.7,0.9 --steps "$steps" --out "$out/cts-nfe$steps"
  evotok bench "${common[@]}" -m "$base" --adapter "$runs/sft" -d hard-mask --steps "$steps" \
      --out "$out/sft-nfe$steps"
done
evotok bench "${common[@]}" -m "$base" --adapter "$runs/d2f" -d d2f --opt block_size=16 --steps 48 \
    --out "$out/d2f"
evotok bench report "$out"/* --out "$out/report"
