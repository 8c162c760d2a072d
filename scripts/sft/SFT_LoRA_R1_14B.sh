#!/usr/bin/env bash
# LoRA SFT of DeepSeek-R1-Distill-Qwen-14B on the tokenized Hybrid-OpenThoughts2-1M data at 16k tokens.
#
# Usage: bash scripts/sft/SFT_LoRA_R1_14B.sh train
#
# Reads  assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_14B_Megatron_TP${TP}PP${PP} (frozen base)
#        assets/data/Vinnnf-Hybrid-OpenThoughts2-1M-1.5B/Tokenized-...-14B-16384_{text,loss_mask}_document
# Writes assets/checkpoints/SFT_LoRA_R1_14B/ (iter_*/ with adapters + lora.json naming the base,
#        tensorboard/, train_log.jsonl). Re-running resumes. Export: merge_and_export.sh (merged
#        model) or export_lora_adapter.sh (PEFT adapter). Every knob is an environment override.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sft_usage "$0" "${1:-}"

# --- cluster layout (torchrun's multi-node rendezvous; one node unless set)
sft_cluster_defaults

# --- parallelism: the converted checkpoint must be split the same way (convert_*.sh 14B TP PP).
# TP=2 holds the frozen bf16 base (28 GB) in 14 GB per GPU. CP splits each row over CP GPUs.
# Sequence parallelism works with LoRA (proven on CPU, not yet on a GPU): SEQUENCE_PARALLEL=1.
: "${TP:=2}"
: "${PP:=1}"
: "${CP:=1}"
: "${SEQUENCE_PARALLEL:=0}"

# --- LoRA: rank-R adapters on every attention and MLP linear; the update is scaled by alpha/R
: "${LORA_RANK:=32}"
: "${LORA_ALPHA:=64}"
: "${LORA_DROPOUT:=0.05}"
: "${LORA_TARGETS:=linear_qkv,linear_proj,linear_fc1,linear_fc2}"

# --- data and batch: 16k-token packed sequences, global batch in sequences
: "${SEQ_LEN:=16384}"
: "${MBS:=1}"
: "${GBS:=64}"
: "${TRAIN_EPOCHS:=1}"
: "${TRAIN_ITERS:=}"           # set to override TRAIN_EPOCHS

# --- optimisation: adapters take a larger learning rate than full fine-tuning
: "${LR:=1e-4}"
: "${MIN_LR:=1e-5}"
: "${WARMUP_FRACTION:=0.03}"
: "${WEIGHT_DECAY:=0.0}"
: "${CLIP_GRAD:=1.0}"
: "${RECOMPUTE:=full}"         # full | selective | none: 16k tokens of 14B activations need it
# LoRA works with either layer spec. Local stays the default because the Transformer Engine path
# (adapters on TE's fused norm + linear) is proven on CPU stand-ins only, not yet on a GPU;
# TRANSFORMER_IMPL=transformer_engine opts in. Auto attention: te with TE layers, else varlen
# (flex without it).
: "${TRANSFORMER_IMPL:=local}"
: "${ATTENTION_BACKEND:=auto}"

# --- paths
: "${CKPT:=$ASSETS_DIR/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_14B_Megatron_TP${TP}PP${PP}}"
: "${DATA_PATH:=$ASSETS_DIR/data/Vinnnf-Hybrid-OpenThoughts2-1M-1.5B/Tokenized-Vinnnf-Hybrid-OpenThoughts2-1M-1.5B-deepseek_ai_DeepSeek_R1_Distill_Qwen_14B-${SEQ_LEN}}"
: "${HF_MODEL:=}"              # an HF model directory: the base, read directly (converted in
                               # memory; the first save writes it once to SAVE_DIR/base)
: "${SAVE_DIR:=$ASSETS_DIR/checkpoints/SFT_LoRA_R1_14B}"
: "${SAVE_INTERVAL:=500}"
: "${EVAL_INTERVAL:=500}"
: "${WANDB_PROJECT:=}"

# --- resume from our own latest checkpoint (its lora.json names the base), else start at the base
sft_pick_load "$CKPT" "$SAVE_DIR" assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_14B \
  "bash scripts/checkpoints/convert_deepseek_r1_to_megatron.sh 14B $TP $PP" \
  "python scripts/checkpoints/download_hf_models.py --model-card deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"
sft_require_data "$DATA_PATH" "run scripts/data/tokenize_dataset.sh first"
mkdir -p "$SAVE_DIR"

args=(
  --load "$LOAD" --save "$SAVE_DIR" --save-interval "$SAVE_INTERVAL"
  --data-path "$DATA_PATH" --split 99,1,0 --seq-length "$SEQ_LEN"
  --micro-batch-size "$MBS" --global-batch-size "$GBS"
  --lora-rank "$LORA_RANK" --lora-alpha "$LORA_ALPHA" --lora-dropout "$LORA_DROPOUT"
  --lora-target-modules "$LORA_TARGETS" --transformer-impl "$TRANSFORMER_IMPL"
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction "$WARMUP_FRACTION"
  --weight-decay "$WEIGHT_DECAY" --clip-grad "$CLIP_GRAD" --adam-beta1 0.9 --adam-beta2 0.95
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --context-parallel-size "$CP"
  --bf16 --use-distributed-optimizer --attention-backend "$ATTENTION_BACKEND"
  --eval-interval "$EVAL_INTERVAL" --eval-iters 10 --log-interval 1
  --tensorboard-dir "$SAVE_DIR/tensorboard" --log-json "$SAVE_DIR/train_log.jsonl"
)
if [[ -n "$TRAIN_ITERS" ]]; then args+=(--train-iters "$TRAIN_ITERS"); else args+=(--train-epochs "$TRAIN_EPOCHS"); fi
[[ "$RECOMPUTE" != "none" ]] && args+=(--recompute-granularity "$RECOMPUTE")
[[ -n "$WANDB_PROJECT" ]] && args+=(--wandb-project "$WANDB_PROJECT")
[[ "$SEQUENCE_PARALLEL" == 1 ]] && args+=(--sequence-parallel)

# --- launch one process per GPU on every node
export CUDA_DEVICE_MAX_CONNECTIONS=1   # lets TP communication overlap compute
sft_launch "${args[@]}"
