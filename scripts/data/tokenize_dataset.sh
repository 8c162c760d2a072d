#!/usr/bin/env bash
# Pre-tokenise an SFT data file for Megatron-SFT training.
#
# Usage: bash scripts/data/tokenize_dataset.sh TOKENIZER_DIR DATA_FILE MAX_LEN [WORKERS]
#   TOKENIZER_DIR  HF model/tokenizer folder (tokenizer.json + tokenizer_config.json)
#   DATA_FILE      .jsonl / .json (optionally .gz/.bz2/.xz/.zst) / .parquet file, a folder of those,
#                  or an HF save_to_disk folder
#   MAX_LEN        longest sample in tokens (the training --seq-length); longer ones are dropped
#   WORKERS        worker processes (default: $WORKERS, else all CPU cores)
#
# Creates, next to DATA_FILE:
#   Tokenized-{dataset}-{tokenizer}-{MAX_LEN}_text_document.{bin,idx}
#   Tokenized-{dataset}-{tokenizer}-{MAX_LEN}_loss_mask_document.{bin,idx}
#   Tokenized-{dataset}-{tokenizer}-{MAX_LEN}_stats.json
#
# A dataset already there is an error (it may have been made with other options); FORCE=1
# replaces it. A second run on the same output at the same time stops, naming the first.
#
# Environment: PYTHON (default python), FORCE (1: replace an existing dataset), EXTRA_ARGS (more
# tools/preprocess_data_sft.py flags, e.g. EXTRA_ARGS="--truncate --loss-on last-assistant").
set -euo pipefail

if [[ $# -lt 3 || $# -gt 4 ]]; then
    # print the header comment (everything up to the first non-comment line) as usage
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
fi

TOKENIZER_DIR=$1
DATA_FILE=$2
MAX_LEN=$3
WORKERS=${4:-${WORKERS:-$(nproc 2>/dev/null || echo 1)}}
: "${PYTHON:=python}"
: "${EXTRA_ARGS:=}"
: "${FORCE:=0}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# ---
# One call does everything: the Python tool streams the file through WORKERS processes and only
# publishes the .bin/.idx pair once it is complete, so a failed run leaves nothing half-written.
# FORCE=1 says replacing the dataset there is meant (without it an existing one is refused).
force=()
[[ "$FORCE" == "1" ]] && force=(--force)
# shellcheck disable=SC2086  # EXTRA_ARGS is deliberately word-split into flags
"$PYTHON" "$REPO_ROOT/tools/preprocess_data_sft.py" \
    --input "$DATA_FILE" \
    --tokenizer-model "$TOKENIZER_DIR" \
    --seq-length "$MAX_LEN" \
    --workers "$WORKERS" \
    ${force[@]+"${force[@]}"} \
    $EXTRA_ARGS
