#!/usr/bin/env bash
# The model card's comparison at NFE = gen/1, gen/2, gen/4 (48, 24, 12 forward passes for 48 tokens):
#   hard-mask and training-free evotoken on the pretrained model (alpha swept at NFE 48, chosen on the
#   test set as in the paper; alpha 0.7 at the smaller budgets), evotoken with the CTS adapter (the same),
#   hard-mask with the FT-baseline adapter (plain SFT, same data and steps as CTS), and d2f with the D2F
#   adapter (threshold-driven: its NFE is what its thresholds make it).
# Usage: bash examples/bundled_model/evaluate.sh [RUNS_DIR [LIMIT]]    (about 22 minutes on 2 CPU cores)
#   The models are the recipe's RUNS_DIR/{base,cts,sft,d2f} where RUNS_DIR/base exists, else the bundled model
#   and the three adapters it ships (the same weights, packaged by package.sh); results go to RUNS_DIR/eval.
set -euo pipefail
runs=${1:-runs/bundled}
limit=${2:-50}
out="$runs/eval"
if [[ -d $runs/base ]]; then
  model=(-m "$runs/base") cts=$runs/cts sft=$runs/sft d2f=$runs/d2f
else
  echo "evaluate.sh: no $runs/base; evaluating the bundled model and its shipped adapters" >&2
  model=() cts=cts sft=sft d2f=d2f
fi
common=(sudoku4 arith-small arith countdown3 --limit "$limit" --batch-size 50 --gen-length 48 --block-length 16)
for steps in 48 24 12; do
  if [[ $steps == 48 ]]; then alphas=0.5,0.7,0.9; else alphas=0.7; fi
  evotok bench "${common[@]}" ${model[@]+"${model[@]}"} -d hard-mask -d evotoken --sweep alpha=$alphas \
      --steps "$steps" --out "$out/base-nfe$steps"
  evotok bench "${common[@]}" ${model[@]+"${model[@]}"} --adapter "$cts" -d evotoken --sweep alpha=$alphas \
      --steps "$steps" --out "$out/cts-nfe$steps"
  evotok bench "${common[@]}" ${model[@]+"${model[@]}"} --adapter "$sft" -d hard-mask --steps "$steps" \
      --out "$out/sft-nfe$steps"
done
evotok bench "${common[@]}" ${model[@]+"${model[@]}"} --adapter "$d2f" -d d2f --opt block_size=16 --steps 48 \
    --out "$out/d2f"
evotok bench report "$out"/*-nfe* "$out"/d2f --x nfe --out "$out/report"
