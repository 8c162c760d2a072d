#!/usr/bin/env bash
# Convert a HuggingFace model directory into a Megatron checkpoint split for TP x PP (x EP).
#
# Usage: scripts/checkpoints/convert_hf_to_megatron.sh HF_DIR TP PP [OUT_DIR]
#
# Creates OUT_DIR (default: HF_DIR_Megatron_TP{TP}PP{PP}[EP{EP}][ETP{ETP}]) holding
#   latest_checkpointed_iteration.txt  and  iter_0000001/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt
# Environment overrides:
#   EP=N            Mixture-of-Experts models: split the routed experts over N ranks (default 1)
#   ETP=1           keep each expert whole with TP > 1 (EP a multiple of TP), default: = TP
#   VPP_LAYERS=N    layers per virtual pipeline stage (interleaved schedule), default unset
#   PARAMS_DTYPE=bf16|fp16|fp32   cast weights, default: keep the HF dtype
#   FORCE=1         replace an existing OUT_DIR
#   PYTHON=python   interpreter (default: python3)
set -euo pipefail

if [[ $# -lt 3 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
HF_DIR=${1%/}
TP=$2
PP=$3
: "${EP:=1}"
SUFFIX=TP${TP}PP${PP}$( (( EP > 1 )) && echo "EP${EP}" || true)${ETP:+ETP${ETP}}
OUT_DIR=${4:-${HF_DIR}_Megatron_${SUFFIX}}
: "${PYTHON:=python3}"
: "${FORCE:=0}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# --- build the flag list from the environment
args=(--load-dir "$HF_DIR" --save-dir "$OUT_DIR"
      --target-tensor-parallel-size "$TP" --target-pipeline-parallel-size "$PP"
      --target-expert-model-parallel-size "$EP")
[[ -n "${VPP_LAYERS:-}" ]] && args+=(--target-num-layers-per-virtual-pipeline-stage "$VPP_LAYERS")
[[ -n "${ETP:-}" ]] && args+=(--target-expert-tensor-parallel-size "$ETP")
[[ -n "${PARAMS_DTYPE:-}" ]] && args+=(--params-dtype "$PARAMS_DTYPE")
[[ "$FORCE" == "1" ]] && args+=(--force)

# --- convert (validates everything first; output appears only when complete)
exec "$PYTHON" "$REPO/tools/convert_hf_to_megatron.py" "${args[@]}"
