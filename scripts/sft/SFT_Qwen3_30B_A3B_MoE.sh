#!/usr/bin/env bash
# SFT of Qwen3-30B-A3B (128 experts, top-8) with expert parallelism, on one or more 8-GPU nodes.
#
# Usage: bash scripts/sft/SFT_Qwen3_30B_A3B_MoE.sh train
#
# Reads  assets/checkpoints/Qwen_Qwen3_30B_A3B_Megatron_TP${TP}PP${PP}EP${EP}
#        (EP=$EP bash scripts/checkpoints/convert_hf_to_megatron.sh HF_DIR $TP $PP) and DATA_PATH
#        (a prefix from scripts/data/tokenize_dataset.sh with the Qwen3 tokenizer).
# Writes assets/checkpoints/SFT_Qwen3_30B_A3B/ (iter_*/, train_log.jsonl with the per-layer
#        aux loss and load imbalance, tensorboard/). Re-running resumes from the latest there.
# HF_MODEL=DIR reads the downloaded HF model directly (no conversion step).
# Every knob is an environment override (EP, TP, PP, MOE_EXPERTS_IMPL, MOE_DISPATCHER, ...).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sft_usage "$0" "${1:-}"

# --- cluster layout (torchrun's multi-node rendezvous; one node unless set)
sft_cluster_defaults

# --- parallelism: the converted checkpoint must be split the same way (TP x PP x EP files).
# Experts are carved out of data parallelism: 8 GPUs at TP1 PP1 EP8 are DP8 for attention and
# one eighth of the 128 experts each. MoE with TP > 1 trains with sequence parallelism only.
: "${TP:=1}"
: "${PP:=1}"
: "${EP:=8}"

# --- Mixture-of-Experts
: "${MOE_EXPERTS_IMPL:=auto}"     # auto | grouped_mm | sequential | te (auto: te in the NVIDIA container)
: "${MOE_DISPATCHER:=alltoall}"   # alltoall | allgather
: "${MOE_AUX_LOSS_COEFF:=}"       # default: the HF config's router_aux_loss_coef (0.001)
: "${MOE_Z_LOSS_COEFF:=}"         # default: off
: "${MOE_CAPACITY_FACTOR:=}"      # default: dropless

# --- data and batch: packed sequences, global batch in sequences
: "${SEQ_LEN:=8192}"
: "${MBS:=1}"
: "${GBS:=64}"
: "${TRAIN_EPOCHS:=1}"
: "${TRAIN_ITERS:=}"             # set to override TRAIN_EPOCHS
: "${LR:=1e-5}"
: "${MIN_LR:=1e-6}"
: "${WARMUP_FRACTION:=0.03}"
: "${CLIP_GRAD:=1.0}"
: "${RECOMPUTE:=full}"           # full | selective | none
: "${ATTENTION_BACKEND:=auto}"

# --- paths
: "${CKPT:=$ASSETS_DIR/checkpoints/Qwen_Qwen3_30B_A3B_Megatron_TP${TP}PP${PP}EP${EP}}"
: "${DATA_PATH:=}"
: "${HF_MODEL:=}"              # an HF model directory: --load it directly (converted in memory)
: "${SAVE_DIR:=$ASSETS_DIR/checkpoints/SFT_Qwen3_30B_A3B}"
: "${SAVE_INTERVAL:=500}"
: "${EVAL_INTERVAL:=500}"

# --- resume from our own latest checkpoint when there is one, else start from HF_MODEL (read
# directly, each GPU its shard) or the conversion
sft_pick_load "$CKPT" "$SAVE_DIR" assets/checkpoints/Qwen_Qwen3_30B_A3B \
  "EP=$EP bash scripts/checkpoints/convert_hf_to_megatron.sh HF_DIR $TP $PP $CKPT" \
  "python scripts/checkpoints/download_hf_models.py --model-card Qwen/Qwen3-30B-A3B"
sft_require_data "$DATA_PATH" "tokenize with scripts/data/tokenize_dataset.sh and set DATA_PATH to its prefix"
mkdir -p "$SAVE_DIR"

args=(
  --load "$LOAD" --save "$SAVE_DIR" --save-interval "$SAVE_INTERVAL"
  --data-path "$DATA_PATH" --split 99,1,0 --seq-length "$SEQ_LEN"
  --micro-batch-size "$MBS" --global-batch-size "$GBS"
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction "$WARMUP_FRACTION"
  --clip-grad "$CLIP_GRAD"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP" --moe-token-dispatcher-type "$MOE_DISPATCHER"
  --moe-experts-impl "$MOE_EXPERTS_IMPL"
  --bf16 --use-distributed-optimizer --attention-backend "$ATTENTION_BACKEND"
  --eval-interval "$EVAL_INTERVAL" --eval-iters 10 --log-interval 1
  --tensorboard-dir "$SAVE_DIR/tensorboard" --log-json "$SAVE_DIR/train_log.jsonl"
)
if [[ -n "$TRAIN_ITERS" ]]; then args+=(--train-iters "$TRAIN_ITERS"); else args+=(--train-epochs "$TRAIN_EPOCHS"); fi
[[ -n "$MOE_AUX_LOSS_COEFF" ]] && args+=(--moe-aux-loss-coeff "$MOE_AUX_LOSS_COEFF")
[[ -n "$MOE_Z_LOSS_COEFF" ]] && args+=(--moe-z-loss-coeff "$MOE_Z_LOSS_COEFF")
[[ -n "$MOE_CAPACITY_FACTOR" ]] && args+=(--moe-expert-capacity-factor "$MOE_CAPACITY_FACTOR")
[[ "$RECOMPUTE" != "none" ]] && args+=(--recompute-granularity "$RECOMPUTE")
(( TP > 1 )) && args+=(--sequence-parallel)

# --- launch one process per GPU on every node
export CUDA_DEVICE_MAX_CONNECTIONS=1   # lets TP communication overlap compute
sft_launch "${args[@]}"
