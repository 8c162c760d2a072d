#!/usr/bin/env bash
# SFT of DeepSeek-R1-Distill-Qwen-7B on 32k-token packed reasoning traces, CP2 x TP2 on 8 GPUs.
#
# Usage: bash scripts/sft/SFT_R1_7B_32k_CP.sh train
#
# Reads  assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_7B_Megatron_TP${TP}PP${PP}
#        assets/data/Vinnnf-Hybrid-OpenThoughts2-1M-1.5B/Tokenized-...-7B-32768_{text,loss_mask}_document
# Writes assets/checkpoints/SFT_R1_7B_32k/ (iter_*/, latest_checkpointed_iteration.txt,
#        tensorboard/, train_log.jsonl). Re-running resumes from the latest checkpoint there.
# HF_MODEL=DIR reads the downloaded HF model directly (no conversion step).
# Every knob is an environment override, e.g.  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 CP=4 bash ...
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sft_usage "$0" "${1:-}"

# --- cluster layout (torchrun's multi-node rendezvous; one node unless set)
sft_cluster_defaults

# --- parallelism. 32k tokens of a 7B model do not fit one GPU's activations: CP=2 gives each
# GPU 16k tokens of every row (K/V all-gathered per layer, small with 4 KV heads), TP=2 with
# sequence parallelism splits the weights and the norms' tokens again; 8 GPUs = DP 2. The
# checkpoint is converted for TP x PP only (convert_deepseek_r1_to_megatron.sh 7B 2 1).
: "${TP:=2}"
: "${PP:=1}"
: "${CP:=2}"

# --- data and batch: MAX_LEN is tokenize_dataset.sh's (the data's name, its longest sample); a
# row holds SEQ_LEN tokens, each GPU MBS x SEQ_LEN / CP of them per micro-batch
: "${MAX_LEN:=32768}"
: "${SEQ_LEN:=$MAX_LEN}"
: "${MBS:=1}"
: "${GBS:=32}"
: "${TRAIN_EPOCHS:=1}"
: "${TRAIN_ITERS:=}"           # set to override TRAIN_EPOCHS

# --- optimisation
: "${LR:=1e-5}"
: "${MIN_LR:=1e-6}"
: "${WARMUP_FRACTION:=0.03}"
: "${WEIGHT_DECAY:=0.0}"
: "${CLIP_GRAD:=1.0}"
: "${RECOMPUTE:=full}"         # full | selective | none
# auto = te (TE's own CP) in the NVIDIA container, else varlen on CUDA; flex | sdpa also do CP
: "${ATTENTION_BACKEND:=auto}"
# the [16k, 152k] logits per GPU would be 5 GB in bf16: auto computes the loss in chunks
: "${CHUNKED_LOSS:=auto}"

# --- paths
: "${CKPT:=$ASSETS_DIR/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_7B_Megatron_TP${TP}PP${PP}}"
: "${DATA_PATH:=$ASSETS_DIR/data/Vinnnf-Hybrid-OpenThoughts2-1M-1.5B/Tokenized-Vinnnf-Hybrid-OpenThoughts2-1M-1.5B-deepseek_ai_DeepSeek_R1_Distill_Qwen_7B-${MAX_LEN}}"
: "${HF_MODEL:=}"              # an HF model directory: --load it directly (converted in memory)
: "${SAVE_DIR:=$ASSETS_DIR/checkpoints/SFT_R1_7B_32k}"
: "${SAVE_INTERVAL:=200}"
: "${EVAL_INTERVAL:=200}"
: "${WANDB_PROJECT:=}"

# --- resume from our own latest checkpoint when there is one, else start from HF_MODEL (read
# directly, each GPU its shard) or the conversion
sft_pick_load "$CKPT" "$SAVE_DIR" assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_7B \
  "bash scripts/checkpoints/convert_deepseek_r1_to_megatron.sh 7B $TP $PP" \
  "python scripts/checkpoints/download_hf_models.py --model-card deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
sft_require_data "$DATA_PATH" "run scripts/data/tokenize_dataset.sh assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_7B DATA.json $MAX_LEN first"
mkdir -p "$SAVE_DIR"

# --- rows are cut into 2 x CP chunks, and each GPU's tokens over TP with sequence parallelism:
# round SEQ_LEN up to that multiple (the extra positions are padding)
MULTIPLE=$(( (CP > 1 ? 2 * CP : 1) * (TP > 1 ? TP : 1) ))
if (( SEQ_LEN % MULTIPLE )); then
  ROUNDED=$(( (SEQ_LEN / MULTIPLE + 1) * MULTIPLE ))
  echo "note: SEQ_LEN $SEQ_LEN -> $ROUNDED, a multiple of $MULTIPLE (2 x CP=$CP x TP=$TP)" >&2
  SEQ_LEN=$ROUNDED
fi

args=(
  --load "$LOAD" --save "$SAVE_DIR" --save-interval "$SAVE_INTERVAL"
  --data-path "$DATA_PATH" --split 99,1,0 --seq-length "$SEQ_LEN"
  --micro-batch-size "$MBS" --global-batch-size "$GBS"
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction "$WARMUP_FRACTION"
  --weight-decay "$WEIGHT_DECAY" --clip-grad "$CLIP_GRAD" --adam-beta1 0.9 --adam-beta2 0.95
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --context-parallel-size "$CP" --chunked-loss "$CHUNKED_LOSS"
  --bf16 --use-distributed-optimizer --attention-backend "$ATTENTION_BACKEND"
  --eval-interval "$EVAL_INTERVAL" --eval-iters 10 --log-interval 1
  --tensorboard-dir "$SAVE_DIR/tensorboard" --log-json "$SAVE_DIR/train_log.jsonl"
)
if [[ -n "$TRAIN_ITERS" ]]; then args+=(--train-iters "$TRAIN_ITERS"); else args+=(--train-epochs "$TRAIN_EPOCHS"); fi
[[ "$RECOMPUTE" != "none" ]] && args+=(--recompute-granularity "$RECOMPUTE")
[[ -n "$WANDB_PROJECT" ]] && args+=(--wandb-project "$WANDB_PROJECT")
(( TP > 1 )) && args+=(--sequence-parallel)

# --- launch one process per GPU on every node
export CUDA_DEVICE_MAX_CONNECTIONS=1   # lets TP communication overlap compute
sft_launch "${args[@]}"
