#!/usr/bin/env bash
# SFT of Moonlight-16B-A3B (DeepSeek-V3 architecture: multi-latent attention, 64 experts top-6
# with a shared expert and a sigmoid router with expert bias) on one 8-GPU node, straight from
# the HF directory (also DeepSeek-V2-Lite: HF_MODEL=its dir).
#
# Usage: HF_MODEL=DIR DATA_PATH=PREFIX bash scripts/sft/SFT_Moonlight_16B_A3B.sh train
#
# Reads  HF_MODEL (bf16 or the block-FP8 format; dequantised as it is read) and DATA_PATH (a
#        prefix from scripts/data/tokenize_dataset.sh with the model's tokenizer).
# Writes assets/checkpoints/SFT_Moonlight_16B_A3B/ (iter_*/, train_log.jsonl with the per-layer
#        aux loss, load imbalance and expert-bias drift, tensorboard/) and SAVE_HF (an HF copy at
#        the end). Re-running resumes from the latest there.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sft_usage "$0" "${1:-}"

# --- one node
sft_cluster_defaults

# --- parallelism: 64 experts over EP8 (8 per GPU), attention data-parallel over the 8 GPUs.
# 27 layers: PP must divide them (1, 3, 9, 27); MoE with TP > 1 needs sequence parallelism.
: "${TP:=1}"
: "${PP:=1}"
: "${EP:=8}"

# --- routing: the release's expert bias is updated as megatron-core does (rate 1e-3) unless
# frozen; BIAS_RATE sets the rate
: "${FREEZE_EXPERT_BIAS:=0}"
: "${BIAS_RATE:=}"
: "${MOE_AUX_LOSS_COEFF:=0}"

# --- data and batch: packed sequences, global batch in sequences
: "${SEQ_LEN:=8192}"
: "${MBS:=1}"
: "${GBS:=64}"
: "${TRAIN_EPOCHS:=1}"
: "${TRAIN_ITERS:=}"
: "${LR:=1e-5}"
: "${MIN_LR:=1e-6}"
: "${WARMUP_FRACTION:=0.03}"
: "${CLIP_GRAD:=1.0}"
: "${RECOMPUTE:=full}"
: "${ATTENTION_BACKEND:=auto}"   # MLA runs on the packed backends: varlen, flex (CUDA), sdpa

# --- paths
: "${HF_MODEL:=}"
: "${DATA_PATH:=}"
: "${SAVE_DIR:=$ASSETS_DIR/checkpoints/SFT_Moonlight_16B_A3B}"
: "${SAVE_INTERVAL:=500}"
: "${EVAL_INTERVAL:=500}"
: "${SAVE_HF:=}"

# --- inputs checked before any GPU starts
if [[ -z "$HF_MODEL" || ! -f "$HF_MODEL/config.json" ]]; then
  echo "error: HF_MODEL='${HF_MODEL}' has no config.json; set HF_MODEL to the downloaded model (scripts/checkpoints/download_hf_models.py --model-card moonshotai/Moonlight-16B-A3B-Instruct)" >&2
  exit 2
fi
sft_require_data "$DATA_PATH" "tokenize with scripts/data/tokenize_dataset.sh and set DATA_PATH to its prefix"
# a re-run resumes from the run's own latest checkpoint, else starts from HF_MODEL
LOAD=$HF_MODEL
[[ -f "$SAVE_DIR/latest_checkpointed_iteration.txt" ]] && LOAD=$SAVE_DIR
mkdir -p "$SAVE_DIR"

# --- the layout and its memory, before launch
"$PYTHON" "$REPO/tools/plan_memory.py" --hf-model "$HF_MODEL" --gpus $((GPUS_PER_NODE * NNODES)) \
  --tp "$TP" --pp "$PP" --ep "$EP" --seq-length "$SEQ_LEN" --micro-batch-size "$MBS"

args=(
  --load "$LOAD" --save "$SAVE_DIR" --save-interval "$SAVE_INTERVAL"
  --data-path "$DATA_PATH" --split 99,1,0 --seq-length "$SEQ_LEN"
  --micro-batch-size "$MBS" --global-batch-size "$GBS"
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction "$WARMUP_FRACTION"
  --clip-grad "$CLIP_GRAD"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP" --moe-aux-loss-coeff "$MOE_AUX_LOSS_COEFF"
  --transformer-impl local --attention-backend "$ATTENTION_BACKEND"
  --bf16 --use-distributed-optimizer
  --eval-interval "$EVAL_INTERVAL" --eval-iters 10 --log-interval 1
  --tensorboard-dir "$SAVE_DIR/tensorboard" --log-json "$SAVE_DIR/train_log.jsonl"
)
if [[ -n "$TRAIN_ITERS" ]]; then args+=(--train-iters "$TRAIN_ITERS"); else args+=(--train-epochs "$TRAIN_EPOCHS"); fi
[[ "$FREEZE_EXPERT_BIAS" == 1 ]] && args+=(--moe-router-freeze-expert-bias)
[[ -n "$BIAS_RATE" ]] && args+=(--moe-router-bias-update-rate "$BIAS_RATE")
[[ "$RECOMPUTE" != "none" ]] && args+=(--recompute-granularity "$RECOMPUTE")
[[ -n "$SAVE_HF" ]] && args+=(--save-hf "$SAVE_HF")
(( TP > 1 )) && args+=(--sequence-parallel)

# --- launch one process per GPU
export CUDA_DEVICE_MAX_CONNECTIONS=1
sft_launch "${args[@]}"
