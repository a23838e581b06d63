#!/usr/bin/env bash
# Remake every picture of docs/guide.md on the bundled model (no --model: the default).
#   bash docs/img/make_pictures.sh [EVAL_DIR]
# EVAL_DIR: the bench runs of the bundled model's evaluation (examples/bundled_model/evaluate.sh), whose
# report becomes bench.png; without it that picture is left as it is.
set -euo pipefail
img=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
eval_dir=${1:-}
prompt=$'Sudoku 4x4 (0 = blank):\n0012|0230|4320|0103'

# 1. the same prompt, hard-mask next to evotoken (the model's defaults: gen 48, blocks of 16, 48 steps)
evotok generate -p "$prompt" -d hard-mask --trace "$work/hard.jsonl" --json > "$work/hard-mask.json"
evotok generate -p "$prompt" -d evotoken --trace "$work/evo.jsonl" --json > "$work/evotoken.json"
evotok trace "$work/hard.jsonl" --png "$img/hard-mask.png"
evotok trace "$work/evo.jsonl" --png "$img/evotoken.png" --html "$img/evotoken.html"
evotok generate -p "$prompt" -d evotoken --adapter cts --trace "$work/cts.jsonl" --json > "$work/evotoken-cts.json"
evotok trace "$work/cts.jsonl" --png "$img/evotoken-cts.png"

# 2. a revision, up close: a held-out arith-small problem (test #33) whose training-free evotoken run
#    revises a cell; the HTML page with the tooltip open on the first revised cell
revision_prompt='Eva has 8 books. Then Eva gets 2 times as many books. Uma gives Eva 2 books. How many books does Eva have now?'
evotok generate -p "$revision_prompt" -d evotoken --trace "$work/rev.jsonl" --json > "$work/revision.json"
evotok trace "$work/rev.jsonl" --html "$img/revision.html"
python "$img/screenshot.py" "$img/revision.html" "$img/revision.png"

# 3. the d2f pipeline, with the D2F-distilled adapter
evotok generate -p "$prompt" -d d2f --adapter d2f --opt block_size=16 --trace "$work/d2f.jsonl" \
    --json > "$work/d2f.json"
evotok trace "$work/d2f.jsonl" --png "$img/d2f.png"

# 4. a benchmark plot: the model card's runs at the three forward-pass budgets
if [[ -n "$eval_dir" ]]; then
  evotok bench report "$eval_dir"/base-nfe* "$eval_dir"/cts-nfe* "$eval_dir"/sft-nfe* --x nfe --out "$img/bench"
else
  echo "no EVAL_DIR: bench.png left as it is" >&2
fi
# what each run answered, for the text of the guide
for name in hard-mask evotoken evotoken-cts revision d2f; do
  python -c 'import json, sys; r = json.load(open(sys.argv[1]))["results"][0]; print(sys.argv[2], "NFE", r["nfe"], repr(r["text"]))' \
      "$work/$name.json" "$name"
done
rm -rf "$work"
