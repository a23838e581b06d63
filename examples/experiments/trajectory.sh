#!/usr/bin/env bash
# Trajectory length of continuous trajectory supervision: CTS adapters trained with K = 1, 2, 4, 8 unrolled
# passes (the paper's delta-tau), same data, steps and seed otherwise; each benchmarked with evotoken on
# sudoku4, arith-small, countdown3. Training time and peak memory per K come from each run's
# training_args.json / loss log and from benchmarks/cts_memory.py (see the README beside this script).
# Usage: bash examples/experiments/trajectory.sh [OUT]   rerun with the same OUT to resume (training
#   continues from its last checkpoint; finished adapters and bench runs are kept)
# Environment: TASKS (default "sudoku4 arith-small countdown3"), MODEL (default: the bundled model),
#   TRAJECTORIES (default "1 2 4 8"), LINES (training problems per task, default 10000), CONFIG (default: the bundled recipe's cts.yaml, whose
#   trajectory_steps is overridden), TRAIN_ARGS (extra finetune flags, e.g. "--max-steps 300"),
#   LIMIT (default 200), GEN (default "--gen-length 48 --block-length 16 --steps 48"), BATCH (50)
set -euo pipefail
out=${1:-runs/experiments/trajectory}
model=(); [[ -n ${MODEL:-} ]] && model=(-m "$MODEL")
read -r -a gen <<< "${GEN:---gen-length 48 --block-length 16 --steps 48}"
here=$(cd "$(dirname "$0")" && pwd)
read -r -a train_args <<< "${TRAIN_ARGS:-}"
mkdir -p "$out"
data="$out/train.jsonl"
[[ -f $data ]] || evotok data ${TASKS:-sudoku4 arith-small countdown3} --n "${LINES:-10000}" --seed 7 --out "$data"
folders=()
for k in ${TRAJECTORIES:-1 2 4 8}; do
  adapter="$out/cts-k$k"
  if [[ ! -f $adapter/adapter_model.safetensors ]]; then
    resume=(); [[ -d $adapter/checkpoints ]] && resume=(--resume)
    evotok finetune "$data" ${model[@]+"${model[@]}"} --config "${CONFIG:-$here/../bundled_model/cts.yaml}" \
        --trajectory-steps "$k" ${train_args[@]+"${train_args[@]}"} --out "$adapter" ${resume[@]+"${resume[@]}"}
  fi
  evotok bench ${TASKS:-sudoku4 arith-small countdown3} ${model[@]+"${model[@]}"} --adapter "$adapter" -d evotoken \
      --limit "${LIMIT:-200}" --batch-size "${BATCH:-50}" "${gen[@]}" --out "$out/bench-k$k"
  folders+=("$out/bench-k$k")
done
x=nfe; (( ${#folders[@]} > 1 )) && x=trajectory_steps  # one K alone has no axis to plot
evotok bench report "${folders[@]}" --x "$x" --out "$out/report"
