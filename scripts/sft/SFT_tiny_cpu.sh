#!/usr/bin/env bash
# Tiny SFT run on CPU (gloo, 2 processes, TP=2): the recipe `make demo` prepares assets for.
#
# Usage: bash scripts/sft/SFT_tiny_cpu.sh train
#
# Reads  $DEMO_DIR/megatron_TP2PP1 (converted tiny model) and $DEMO_DIR/data/Tokenized-* (from make demo)
# Writes $DEMO_DIR/sft_tiny (checkpoints, train_log.jsonl). Re-running resumes.
# Environment: DEMO_DIR (default runs/demo), TRAIN_ITERS, LR, GBS, MBS, SEQ_LEN, NPROC, TP, PP,
#              DATA_PATH (a Tokenized-* prefix; needed when the data folder holds several),
#              LR_WARMUP_ITERS (default 5, a tenth of TRAIN_ITERS below 50),
#              ATTENTION_BACKEND (default sdpa: per-document attention, no s x s mask),
#              LORA_RANK=R (>0: train LoRA adapters on the frozen model, saved to sft_tiny_lora_rR),
#              LORA_ALPHA (default 2 x LORA_RANK),
#              FSDP=1 (Megatron-FSDP ZeRO-3 over the data-parallel ranks: NPROC=4 for DP=2 at TP=2),
#              HF_MODEL=DIR (e.g. runs/demo/hf_tiny_qwen2: load the HF model directly, no conversion).
set -euo pipefail

# the venv `make demo` builds, unless PYTHON says otherwise
: "${PYTHON:=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.venv/bin/python}"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
sft_usage "$0" "${1:-}"
: "${DEMO_DIR:=$REPO/runs/demo}"
: "${NPROC:=2}"
: "${TP:=2}"
: "${PP:=1}"
: "${SEQ_LEN:=256}"
: "${MBS:=4}"
: "${GBS:=16}"
: "${TRAIN_ITERS:=60}"
: "${LR:=3e-3}"
: "${ATTENTION_BACKEND:=sdpa}"
: "${CKPT:=$DEMO_DIR/megatron_TP${TP}PP${PP}}"
: "${HF_MODEL:=}"              # e.g. $DEMO_DIR/hf_tiny_qwen2: --load the HF model directly instead of CKPT
: "${LR_WARMUP_ITERS:=$(( TRAIN_ITERS >= 50 ? 5 : TRAIN_ITERS / 10 ))}"
if [[ -z "${DATA_PATH:-}" ]]; then
  # The one tokenized dataset of the demo folder; with several, which to train on is the
  # user's choice, not the alphabet's.
  datasets=()
  for idx in "$DEMO_DIR"/data/Tokenized-*_text_document.idx; do
    [[ -e "$idx" ]] && datasets+=("${idx%_text_document.idx}")
  done
  if (( ${#datasets[@]} > 1 )); then
    {
      echo "error: ${#datasets[@]} tokenized datasets in $DEMO_DIR/data; choose one with DATA_PATH:"
      printf '  %s\n' "${datasets[@]}"
      echo "e.g. DATA_PATH=${datasets[0]} bash $0 train"
    } >&2
    exit 2
  fi
  DATA_PATH=${datasets[0]:-}
fi
: "${LORA_RANK:=0}"
: "${FSDP:=0}"
: "${LORA_ALPHA:=$((2 * LORA_RANK))}"
if (( LORA_RANK > 0 )); then
  : "${SAVE_DIR:=$DEMO_DIR/sft_tiny_lora_r$LORA_RANK}"
else
  : "${SAVE_DIR:=$DEMO_DIR/sft_tiny}"
fi

START=${HF_MODEL:-$CKPT}
if [[ -z "$DATA_PATH" || ! ( -f "$START/latest_checkpointed_iteration.txt" || -f "$START/config.json" ) ]]; then
  echo "error: demo assets not found under $DEMO_DIR; run 'make demo' first" >&2
  exit 2
fi
LOAD=$START
[[ -f "$SAVE_DIR/latest_checkpointed_iteration.txt" ]] && LOAD=$SAVE_DIR
# LoRA: adapters on the frozen model's linears (whichever layer spec auto picks: local on CPU);
# the run's checkpoints hold adapters only
lora=()
(( LORA_RANK > 0 )) && lora=(--lora-rank "$LORA_RANK" --lora-alpha "$LORA_ALPHA")
# FSDP: weights, gradients and optimizer state sharded over the data-parallel ranks
[[ "$FSDP" == 1 ]] && lora+=(--use-megatron-fsdp --data-parallel-sharding-strategy optim_grads_params)

# --- gloo on CPU: real megatron-core TP code paths, one process per TP rank
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  "$REPO/tools/train_sft.py" --load "$LOAD" --save "$SAVE_DIR" --save-interval 20 \
  --data-path "$DATA_PATH" --seq-length "$SEQ_LEN" --split 95,5,0 \
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$TRAIN_ITERS" \
  --lr "$LR" --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters "$LR_WARMUP_ITERS" --clip-grad 1.0 \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --attention-backend "$ATTENTION_BACKEND" ${lora[@]+"${lora[@]}"} \
  --eval-interval 20 --eval-iters 2 --log-interval 5 --log-json "$SAVE_DIR.log.jsonl"
