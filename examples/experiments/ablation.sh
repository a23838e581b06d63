#!/usr/bin/env bash
# State ablation (the paper's first ablation): the evotoken decoder with each of its three states switched
# on or off (soft_mask: undecided positions as Soft([MASK]+V); soft_decoded: committed positions as Soft(V)
# until their block ends; revise: committed positions may take a more confident candidate), 8
# combinations x sudoku4, arith-small, countdown3, at 48 and 24 forward passes for 48 tokens. All three
# off is LLaDA's low-confidence remasking (tests/test_ablations.py shows it is hard-mask token for token).
# Usage: bash examples/experiments/ablation.sh [OUT]      rerun with the same OUT to resume
# Environment: TASKS (default "sudoku4 arith-small countdown3"), MODEL (default: the bundled model), ADAPTER, LIMIT (problems per task, default 200),
#   BUDGETS (default "48 24"), GEN (default "--gen-length 48 --block-length 16"), BATCH (default 50)
set -euo pipefail
out=${1:-runs/experiments/ablation}
model=(); [[ -n ${MODEL:-} ]] && model=(-m "$MODEL")
adapter=(); [[ -n ${ADAPTER:-} ]] && adapter=(--adapter "$ADAPTER")
read -r -a gen <<< "${GEN:---gen-length 48 --block-length 16}"
folders=()
for steps in ${BUDGETS:-48 24}; do
  evotok bench ${TASKS:-sudoku4 arith-small countdown3} ${model[@]+"${model[@]}"} ${adapter[@]+"${adapter[@]}"} \
      -d evotoken --sweep soft_mask=true,false --sweep soft_decoded=true,false --sweep revise=true,false \
      --limit "${LIMIT:-200}" --batch-size "${BATCH:-50}" "${gen[@]}" --steps "$steps" --out "$out/nfe$steps"
  folders+=("$out/nfe$steps")
done
evotok bench report "${folders[@]}" --x nfe --out "$out/report"
