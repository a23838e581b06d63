#!/usr/bin/env bash
# Copy the trained base model and its three adapters into the package, in the layout of a real
# checkpoint (adapters under adapters/<name>, usable as `--adapter cts`).
# Usage: bash examples/bundled_model/package.sh RUNS_DIR ASSET_DIR
set -euo pipefail
runs=${1:-runs/bundled}
dest=${2:-evotok_cli/assets/evotok-tiny}
mkdir -p "$dest/adapters"
for f in config.json model.safetensors tokenizer.json tokenizer_config.json chat_template.jinja; do
  cp "$runs/base/$f" "$dest/$f"
done
# the decoding defaults the model was trained for: a 48-token answer window in blocks of 16, after the
# "<reasoning>" prefill that every training answer started from
echo '{"evotok": {"gen_length": 48, "block_length": 16, "steps": 48, "prefill": "<reasoning>"}}' > "$dest/generation_config.json"
for name in cts sft d2f; do
  mkdir -p "$dest/adapters/$name"
  cp "$runs/$name/adapter_model.safetensors" "$dest/adapters/$name/"
  python - "$runs/$name/adapter_config.json" "$dest/adapters/$name/adapter_config.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["base_model_name_or_path"] = "evotok-tiny"  # the folder it ships beside, not the training machine's path
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
PY
done
chmod -R a+rX "$dest"  # readable by everyone, whatever the umask of the training machine
du -sh "$dest"
