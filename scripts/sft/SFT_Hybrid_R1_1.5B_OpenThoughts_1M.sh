#!/usr/bin/env bash
# SFT of DeepSeek-R1-Distill-Qwen-1.5B on the tokenized Hybrid-OpenThoughts2-1M data at 16k tokens.
#
# Usage: bash scripts/sft/SFT_Hybrid_R1_1.5B_OpenThoughts_1M.sh train
#        HF_MODEL=assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B bash ... train
#
# Reads  assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B_Megatron_TP${TP}PP${PP}
#        (or, with HF_MODEL=DIR, the downloaded HF model itself: no conversion step)
#        assets/data/Vinnnf-Hybrid-OpenThoughts2-1M-1.5B/Tokenized-...-16384_{text,loss_mask}_document
# Writes assets/checkpoints/SFT_Hybrid_R1_1.5B/ (iter_*/, latest_checkpointed_iteration.txt,
#        tensorboard/, train_log.jsonl). Re-running resumes from the latest checkpoint there.
# SAVE_HF=DIR also writes the trained model as an HF directory at the end (every SAVE_HF_INTERVAL).
# Every knob is an environment override, e.g.  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 LR=2e-5 bash ...
# FSDP=1 shards weights, gradients and optimizer state over the data-parallel GPUs (ZeRO-3).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sft_usage "$0" "${1:-}"

# --- cluster layout (torchrun's multi-node rendezvous; one node unless set)
sft_cluster_defaults

# --- parallelism: the converted checkpoint must be split the same way (convert_*.sh SIZE TP PP);
# CP (context parallelism) splits every row over CP GPUs and never changes the checkpoint
: "${TP:=1}"
: "${PP:=1}"
: "${CP:=1}"
: "${VPP_LAYERS:=}"             # layers per virtual pipeline stage (interleaved 1F1B), needs PP>=2
# Megatron-FSDP instead of the distributed optimizer (PP=1 only); FSDP_STRATEGY: optim_grads_params
# (ZeRO-3) | optim_grads (ZeRO-2) | optim (ZeRO-1) | no_shard. Checkpoints are the same files.
: "${FSDP:=0}"
: "${FSDP_STRATEGY:=optim_grads_params}"

# --- data and batch: 16k-token packed sequences, global batch in sequences. MAX_LEN is
# tokenize_dataset.sh's (the data's name, its longest sample); a row holds SEQ_LEN tokens, and
# each GPU MBS x SEQ_LEN / CP of them per micro-batch (what CP and MBS are sized for).
: "${MAX_LEN:=16384}"
: "${SEQ_LEN:=$MAX_LEN}"
: "${MBS:=1}"
: "${GBS:=64}"
: "${TRAIN_EPOCHS:=1}"
: "${TRAIN_ITERS:=}"           # set to override TRAIN_EPOCHS

# --- optimisation
: "${LR:=1e-5}"
: "${MIN_LR:=1e-6}"
: "${WARMUP_FRACTION:=0.03}"
: "${WEIGHT_DECAY:=0.0}"
: "${CLIP_GRAD:=1.0}"
: "${RECOMPUTE:=full}"         # full | selective | none: 16k tokens of 1.5B activations need it
# auto = te in the NVIDIA container, else varlen (torch flash varlen) on CUDA; flex | sdpa | dense
: "${ATTENTION_BACKEND:=auto}"

# --- paths
: "${CKPT:=$ASSETS_DIR/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B_Megatron_TP${TP}PP${PP}}"
: "${DATA_PATH:=$ASSETS_DIR/data/Vinnnf-Hybrid-OpenThoughts2-1M-1.5B/Tokenized-Vinnnf-Hybrid-OpenThoughts2-1M-1.5B-deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B-${MAX_LEN}}"
: "${HF_MODEL:=}"              # an HF model directory: --load it directly (converted in memory)
: "${SAVE_DIR:=$ASSETS_DIR/checkpoints/SFT_Hybrid_R1_1.5B}"
: "${SAVE_HF:=}"               # write the trained model here as an HF directory (--save-hf)
: "${SAVE_HF_INTERVAL:=}"      # and every N iterations (--save-hf-interval)
: "${SAVE_INTERVAL:=500}"
: "${KEEP_LAST:=2}"             # checkpoints kept in SAVE_DIR (a 1.5B one with optimizer state: ~25 GB)
: "${EVAL_INTERVAL:=500}"
: "${WANDB_PROJECT:=}"

# --- a layout megatron-core refuses, said before anything else
if [[ "$FSDP" == 1 ]] && (( PP > 1 )); then
  echo "error: FSDP=1 with PP=$PP: megatron-core's Megatron-FSDP does not support pipeline parallelism; use PP=1 (FSDP shards the layers instead) or FSDP=0" >&2
  exit 2
fi

# --- resume from our own latest checkpoint when there is one, else start from HF_MODEL (read
# directly, each GPU its shard) or the conversion
sft_pick_load "$CKPT" "$SAVE_DIR" assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B \
  "bash scripts/checkpoints/convert_deepseek_r1_to_megatron.sh 1.5B $TP $PP" \
  "python scripts/checkpoints/download_hf_models.py --model-card deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
sft_require_data "$DATA_PATH" "run scripts/data/tokenize_dataset.sh first"
mkdir -p "$SAVE_DIR"

# --- rows are cut into 2 x CP chunks, and each GPU's tokens over TP with sequence parallelism
# (on whenever TP > 1): round SEQ_LEN up to that multiple (the extra positions are padding)
MULTIPLE=$(( (CP > 1 ? 2 * CP : 1) * (TP > 1 ? TP : 1) ))
if (( SEQ_LEN % MULTIPLE )); then
  ROUNDED=$(( (SEQ_LEN / MULTIPLE + 1) * MULTIPLE ))
  echo "note: SEQ_LEN $SEQ_LEN -> $ROUNDED, a multiple of $MULTIPLE (2 x CP=$CP x TP=$TP)" >&2
  SEQ_LEN=$ROUNDED
fi

args=(
  --load "$LOAD" --save "$SAVE_DIR" --save-interval "$SAVE_INTERVAL" --keep-last "$KEEP_LAST"
  --data-path "$DATA_PATH" --split 99,1,0 --seq-length "$SEQ_LEN"
  --micro-batch-size "$MBS" --global-batch-size "$GBS"
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction "$WARMUP_FRACTION"
  --weight-decay "$WEIGHT_DECAY" --clip-grad "$CLIP_GRAD" --adam-beta1 0.9 --adam-beta2 0.95
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --context-parallel-size "$CP"
  --bf16 --attention-backend "$ATTENTION_BACKEND"
  --eval-interval "$EVAL_INTERVAL" --eval-iters 10 --log-interval 1
  --tensorboard-dir "$SAVE_DIR/tensorboard" --log-json "$SAVE_DIR/train_log.jsonl"
)
if [[ -n "$TRAIN_ITERS" ]]; then args+=(--train-iters "$TRAIN_ITERS"); else args+=(--train-epochs "$TRAIN_EPOCHS"); fi
[[ -n "$VPP_LAYERS" ]] && args+=(--num-layers-per-virtual-pipeline-stage "$VPP_LAYERS")
[[ "$RECOMPUTE" != "none" ]] && args+=(--recompute-granularity "$RECOMPUTE")
[[ -n "$WANDB_PROJECT" ]] && args+=(--wandb-project "$WANDB_PROJECT")
[[ -n "$SAVE_HF" ]] && args+=(--save-hf "$SAVE_HF")
[[ -n "$SAVE_HF_INTERVAL" ]] && args+=(--save-hf-interval "$SAVE_HF_INTERVAL")
(( TP > 1 )) && args+=(--sequence-parallel)
# FSDP: weights all-gathered layer by layer in the forward pass; else ZeRO-1 (optimizer state only)
if [[ "$FSDP" == 1 ]]; then
  args+=(--use-megatron-fsdp --data-parallel-sharding-strategy "$FSDP_STRATEGY")
else
  args+=(--use-distributed-optimizer)
fi

# --- launch one process per GPU on every node
# One connection lets TP communication overlap compute; FSDP needs several so its all-gathers
# and reduce-scatters run beside compute (Megatron-LM refuses FSDP with 1).
if [[ "$FSDP" == 1 ]]; then
  export CUDA_DEVICE_MAX_CONNECTIONS=8
else
  export CUDA_DEVICE_MAX_CONNECTIONS=1
fi
sft_launch "${args[@]}"
