#!/usr/bin/env bash
# Convert a downloaded DeepSeek-R1-Distill-Qwen model to Megatron for TP x PP.
#
# Usage: scripts/checkpoints/convert_deepseek_r1_to_megatron.sh SIZE TP PP
#   SIZE  1.5B | 7B | 14B | 32B
# Reads  assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_${SIZE}
#        (scripts/checkpoints/download_hf_models.py --model-card deepseek-ai/DeepSeek-R1-Distill-Qwen-${SIZE})
# Writes assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_${SIZE}_Megatron_TP${TP}PP${PP}
# Environment: ASSETS_DIR (default: <repo>/assets) plus everything convert_hf_to_megatron.sh reads.
set -euo pipefail

if [[ $# -ne 3 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
SIZE=$1
TP=$2
PP=$3
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${ASSETS_DIR:=$REPO/assets}"

case "$SIZE" in
  1.5B|7B|14B|32B) ;;
  *) echo "error: SIZE must be one of 1.5B 7B 14B 32B (got '$SIZE')" >&2; exit 2 ;;
esac
HF_DIR="$ASSETS_DIR/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_${SIZE}"
if [[ ! -f "$HF_DIR/config.json" ]]; then
  echo "error: $HF_DIR not found; download it first:" >&2
  echo "  python scripts/checkpoints/download_hf_models.py --model-card deepseek-ai/DeepSeek-R1-Distill-Qwen-${SIZE}" >&2
  exit 2
fi

# --- the generic converter does the work; the output name follows the original usage
exec bash "$REPO/scripts/checkpoints/convert_hf_to_megatron.sh" "$HF_DIR" "$TP" "$PP" \
  "${HF_DIR}_Megatron_TP${TP}PP${PP}"
