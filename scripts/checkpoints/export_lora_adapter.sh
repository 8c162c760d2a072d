#!/usr/bin/env bash
# Export a LoRA run's adapters as an HF PEFT adapter (for peft / vLLM / TGI adapter loading).
# The base model is not copied: load the adapter on top of the HF model the run started from.
#
# Usage: scripts/checkpoints/export_lora_adapter.sh CKPT_DIR HF_REF_DIR OUT_DIR [ITER]
#   CKPT_DIR    a LoRA run's --save directory (trained with --lora-rank R)
#   HF_REF_DIR  the base HF model (recorded in adapter_config.json as base_model_name_or_path;
#               "" for a run trained with --load HF_DIR: the directory it loaded)
#   OUT_DIR     created: adapter_config.json, adapter_model.safetensors
#   ITER        iteration to export (default: latest_checkpointed_iteration.txt)
# Environment: DTYPE=bf16|fp16|fp32 (default: checkpoint dtype), FORCE=1 to replace OUT_DIR,
#              NO_VERIFY=1 to skip the checksum check of CKPT_DIR, PYTHON (default python3)
set -euo pipefail

if [[ $# -lt 3 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
: "${PYTHON:=python3}"
: "${FORCE:=0}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

args=(--load-dir "$1" --save-dir "$3")
[[ -n "$2" ]] && args+=(--hf-reference "$2")
[[ $# -ge 4 ]] && args+=(--iteration "$4")
[[ -n "${DTYPE:-}" ]] && args+=(--dtype "$DTYPE")
[[ "$FORCE" == "1" ]] && args+=(--force)
[[ "${NO_VERIFY:-0}" == "1" ]] && args+=(--no-verify)

# --- join TP/PP adapter shards, split fused QKV and gate/up into HF module names
exec "$PYTHON" "$REPO/tools/export_lora_adapter.py" "${args[@]}"
