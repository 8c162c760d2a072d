#!/usr/bin/env bash
# SFT of gpt-oss-20b (24 layers, 32 experts top-4, attention sinks, 128-token windows on every
# other layer) with expert parallelism, on one 8-GPU node, from the released MXFP4 weights.
#
# Usage: HF_MODEL=assets/checkpoints/openai_gpt_oss_20b DATA_PATH=PREFIX bash scripts/sft/SFT_GPT_OSS_20B.sh train
#
# Reads  HF_MODEL (the release as downloaded: its MXFP4 experts are dequantised to bf16 as each
#        GPU reads its shard) or assets/checkpoints/openai_gpt_oss_20b_Megatron_TP1PP1EP${EP}
#        (EP=$EP bash scripts/checkpoints/convert_hf_to_megatron.sh HF_DIR 1 1), and DATA_PATH
#        (a prefix from scripts/data/tokenize_dataset.sh with the gpt-oss tokenizer).
# Writes assets/checkpoints/SFT_GPT_OSS_20B/ (iter_*/, train_log.jsonl, tensorboard/); export
#        with --save-hf or merge_and_export.sh writes bf16 without quantization_config.
#        Re-running resumes from the latest there.
# Every knob is an environment override (EP, PP, SEQ_LEN, ATTENTION_BACKEND, ...).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sft_usage "$0" "${1:-}"

# --- cluster layout (one node unless set)
sft_cluster_defaults

# --- parallelism: experts stay whole (megatron-core 0.16.1 runs expert biases at expert TP 1
# only), so TP > 1 splits attention only, over ETP 1 with sequence parallelism; 8 GPUs at EP8 are DP8 for attention and 4 of the 32 experts each. Per GPU about 4.3B
# parameters (2.4B of experts + 1.9B replicated): bf16 weights 8.6 GB, fp32 gradients 17 GB,
# Adam states of the experts 29 GB and of the dense part (sharded over DP8) 3 GB: ~58 GB
# before activations, so rows of 4096 with full recompute on 80 GB GPUs.
: "${TP:=1}"
: "${PP:=1}"
: "${EP:=8}"

# --- Mixture-of-Experts: our grouped-GEMM experts compute the expert biases; TE's do not here
: "${MOE_EXPERTS_IMPL:=grouped_mm}"
: "${MOE_DISPATCHER:=alltoall}"
: "${MOE_AUX_LOSS_COEFF:=}"       # default: the HF config's router_aux_loss_coef

# --- attention with learnable sinks on packed rows: flex or varlen (te and dense have none)
: "${ATTENTION_BACKEND:=flex}"
: "${TRANSFORMER_IMPL:=local}"    # the layers the GPT-OSS parity tests prove

# --- data and batch: packed sequences, global batch in sequences
: "${SEQ_LEN:=4096}"
: "${MBS:=1}"
: "${GBS:=64}"
: "${TRAIN_EPOCHS:=1}"
: "${TRAIN_ITERS:=}"             # set to override TRAIN_EPOCHS
: "${LR:=1e-5}"
: "${MIN_LR:=1e-6}"
: "${WARMUP_FRACTION:=0.03}"
: "${CLIP_GRAD:=1.0}"
: "${RECOMPUTE:=full}"           # full | selective | none

# --- paths
if (( TP > 1 )); then ETP_NAME=ETP1; else ETP_NAME=; fi
: "${CKPT:=$ASSETS_DIR/checkpoints/openai_gpt_oss_20b_Megatron_TP${TP}PP${PP}EP${EP}${ETP_NAME}}"
: "${DATA_PATH:=}"
: "${HF_MODEL:=}"              # an HF model directory (MXFP4 or bf16): --load it directly
: "${SAVE_DIR:=$ASSETS_DIR/checkpoints/SFT_GPT_OSS_20B}"
: "${SAVE_INTERVAL:=500}"
: "${EVAL_INTERVAL:=500}"

# TP > 1: attention split by head over whole experts (the rank files then hold them whole: ETP=1)
ETP_ARGS=()
if (( TP > 1 )); then
  ETP_ARGS=(--expert-tensor-parallel-size 1 --sequence-parallel)
fi

# --- resume from our own latest checkpoint when there is one, else start from HF_MODEL (read
# directly, each GPU its shard) or the conversion
sft_pick_load "$CKPT" "$SAVE_DIR" assets/checkpoints/openai_gpt_oss_20b \
  "EP=$EP${ETP_NAME:+ ETP=1} bash scripts/checkpoints/convert_hf_to_megatron.sh HF_DIR $TP $PP $CKPT" \
  "python scripts/checkpoints/download_hf_models.py --model-card openai/gpt-oss-20b"
sft_require_data "$DATA_PATH" "tokenize with scripts/data/tokenize_dataset.sh and set DATA_PATH to its prefix"
mkdir -p "$SAVE_DIR"

args=(
  --load "$LOAD" --save "$SAVE_DIR" --save-interval "$SAVE_INTERVAL"
  --data-path "$DATA_PATH" --split 99,1,0 --seq-length "$SEQ_LEN"
  --micro-batch-size "$MBS" --global-batch-size "$GBS"
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction "$WARMUP_FRACTION"
  --clip-grad "$CLIP_GRAD"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP" ${ETP_ARGS[@]+"${ETP_ARGS[@]}"}
  --moe-token-dispatcher-type "$MOE_DISPATCHER"
  --moe-experts-impl "$MOE_EXPERTS_IMPL" --transformer-impl "$TRANSFORMER_IMPL"
  --bf16 --use-distributed-optimizer --attention-backend "$ATTENTION_BACKEND"
  --eval-interval "$EVAL_INTERVAL" --eval-iters 10 --log-interval 1
  --tensorboard-dir "$SAVE_DIR/tensorboard" --log-json "$SAVE_DIR/train_log.jsonl"
)
if [[ -n "$TRAIN_ITERS" ]]; then args+=(--train-iters "$TRAIN_ITERS"); else args+=(--train-epochs "$TRAIN_EPOCHS"); fi
[[ -n "$MOE_AUX_LOSS_COEFF" ]] && args+=(--moe-aux-loss-coeff "$MOE_AUX_LOSS_COEFF")
[[ "$RECOMPUTE" != "none" ]] && args+=(--recompute-granularity "$RECOMPUTE")

# --- launch one process per GPU
export CUDA_DEVICE_MAX_CONNECTIONS=1
sft_launch "${args[@]}"
