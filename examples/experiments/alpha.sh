#!/usr/bin/env bash
# Alpha sweep: the [MASK] weight of Soft([MASK]+V) from 0.5 to 0.9 and the soft top-k (1, 3, 5), for
# training-free evotoken and for evotoken with the CTS adapter, on sudoku4, arith-small, countdown3 at 48
# forward passes for 48 tokens. The paper grid-searches alpha in {0.5..0.9} and reports the best (chosen
# on the test set); `bench report` plots accuracy against alpha, one line per task and k.
# Usage: bash examples/experiments/alpha.sh [OUT]       rerun with the same OUT to resume
# Environment: TASKS (default "sudoku4 arith-small countdown3"), MODEL (default: the bundled model), CTS (default: the bundled model's `cts` adapter),
#   LIMIT (default 200), STEPS (default 48), GEN (default "--gen-length 48 --block-length 16"), BATCH (50),
#   ALPHAS (default 0.5,0.6,0.7,0.8,0.9), KS (default 1,3,5)
set -euo pipefail
out=${1:-runs/experiments/alpha}
model=(); [[ -n ${MODEL:-} ]] && model=(-m "$MODEL")
read -r -a gen <<< "${GEN:---gen-length 48 --block-length 16}"
common=(${TASKS:-sudoku4 arith-small countdown3} -d evotoken --sweep "alpha=${ALPHAS:-0.5,0.6,0.7,0.8,0.9}" --sweep "k_soft=${KS:-1,3,5}"
        --limit "${LIMIT:-200}" --batch-size "${BATCH:-50}" "${gen[@]}" --steps "${STEPS:-48}")
evotok bench "${common[@]}" ${model[@]+"${model[@]}"} --out "$out/training-free"
evotok bench "${common[@]}" ${model[@]+"${model[@]}"} --adapter "${CTS:-cts}" --out "$out/cts"
evotok bench report "$out/training-free" --x alpha --out "$out/training-free-report"
evotok bench report "$out/cts" --x alpha --out "$out/cts-report"
