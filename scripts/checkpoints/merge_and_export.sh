#!/usr/bin/env bash
# Export a Megatron checkpoint (any TP x PP x VPP) as one HuggingFace model directory.
# "Merge" means joining the tensor- and pipeline-parallel shards back into whole HF tensors
# (un-fusing QKV and gate/up). A LoRA run (--lora-rank; its iter_*/lora.json names the base) is
# merged into its base first: W + (alpha/r) B A per TP shard. For the adapter alone, use
# export_lora_adapter.sh.
#
# Usage: scripts/checkpoints/merge_and_export.sh CKPT_DIR HF_REF_DIR OUT_DIR [ITER]
#   CKPT_DIR    Megatron checkpoint (training --save dir, LoRA run, or a converted checkpoint)
#   HF_REF_DIR  the HF model it came from: tokenizer files, generation config are copied
#               ("" for a run trained with --load HF_DIR: its CKPT_DIR/hf_reference is used)
#   OUT_DIR     created: safetensors shards (+ index), config.json, tokenizer files
#   ITER        iteration to export (default: latest_checkpointed_iteration.txt)
# Environment: DTYPE=bf16|fp16|fp32 (default: checkpoint dtype), MAX_SHARD_SIZE (default 5GB),
#              FORCE=1 to replace OUT_DIR, NO_VERIFY=1 to skip the checksum check of CKPT_DIR,
#              PYTHON (default python3)
set -euo pipefail

if [[ $# -lt 3 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
: "${PYTHON:=python3}"
: "${MAX_SHARD_SIZE:=5GB}"
: "${FORCE:=0}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

args=(--load-dir "$1" --save-dir "$3" --max-shard-size "$MAX_SHARD_SIZE")
[[ -n "$2" ]] && args+=(--hf-reference "$2")
[[ $# -ge 4 ]] && args+=(--iteration "$4")
[[ -n "${DTYPE:-}" ]] && args+=(--dtype "$DTYPE")
[[ "$FORCE" == "1" ]] && args+=(--force)
[[ "${NO_VERIFY:-0}" == "1" ]] && args+=(--no-verify)

# --- merge TP/PP shards stream-wise into HF safetensors
exec "$PYTHON" "$REPO/tools/export_megatron_to_hf.py" "${args[@]}"
