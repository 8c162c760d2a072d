#!/usr/bin/env bash
# Re-split a Megatron checkpoint for another TP x PP (x EP) layout (weights, iteration, LR
# schedule and data position; the optimizer state starts fresh).
#
# Usage: scripts/checkpoints/reshard_checkpoint.sh CKPT_DIR OUT_DIR TP PP [ITER]
# Environment: EP=N (experts over N ranks, Mixture-of-Experts models; default 1), ETP=1 (each
# expert whole with TP > 1; EP a multiple of TP), VPP_LAYERS=N
# (layers per virtual stage), FORCE=1, NO_VERIFY=1 (skip the checksum check of CKPT_DIR),
# PYTHON (default python3)
# A LoRA run stays adapters-only, on its base resharded into OUT_DIR/base; LORA_BASE=DIR uses
# DIR (the same model, already at TP x PP) as the base instead; MERGE_LORA=1 merges instead.
set -euo pipefail

if [[ $# -lt 4 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
: "${PYTHON:=python3}"
: "${FORCE:=0}"
: "${MERGE_LORA:=0}"
: "${EP:=1}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

args=(--load-dir "$1" --save-dir "$2" --target-tensor-parallel-size "$3"
      --target-pipeline-parallel-size "$4" --target-expert-model-parallel-size "$EP")
[[ $# -ge 5 ]] && args+=(--iteration "$5")
[[ -n "${VPP_LAYERS:-}" ]] && args+=(--target-num-layers-per-virtual-pipeline-stage "$VPP_LAYERS")
[[ -n "${ETP:-}" ]] && args+=(--target-expert-tensor-parallel-size "$ETP")
[[ -n "${LORA_BASE:-}" ]] && args+=(--lora-base "$LORA_BASE")
[[ "$MERGE_LORA" == "1" ]] && args+=(--merge-lora)
[[ "$FORCE" == "1" ]] && args+=(--force)
[[ "${NO_VERIFY:-0}" == "1" ]] && args+=(--no-verify)

# --- reshard through the layout-free HF tensor form (adapters: through the PEFT form)
exec "$PYTHON" "$REPO/tools/reshard_checkpoint.py" "${args[@]}"
