#!/usr/bin/env bash
# Show what an SFT dataset teaches: a few samples with the learned tokens highlighted.
#
# Usage: bash scripts/data/inspect_dataset.sh DATASET [TOKENIZER_DIR]
#   DATASET        a tokenized prefix, as scripts/data/tokenize_dataset.sh prints it
#                  (.../Tokenized-{dataset}-{tokenizer}-{MAX_LEN}), or a raw data file / folder
#                  (.jsonl, .json, .parquet, ...) to preview before tokenizing it
#   TOKENIZER_DIR  HF tokenizer folder; needed for a raw file, optional for a prefix (default:
#                  the tokenizer its _stats.json records)
#
# Prints each sample decoded token by token, learned tokens (loss mask 1) coloured in a terminal
# and inside [[...]] otherwise, with its tokens, learned tokens and learned turns. Creates
# nothing unless PLOT is set.
#
# Environment: PYTHON (default python), INDEX (sample numbers, e.g. INDEX="0 7"; default the
# first 3), N (show N random samples instead), SEED (of N, default 0), PLOT (write length and
# learned-share histograms to this PNG), MAX_LEN (the cut-off drawn, and for a raw file the
# pre-tokenizer's MAX_LEN), EXTRA_ARGS (more tools/inspect_sft_data.py flags, e.g.
# EXTRA_ARGS="--loss-on last-assistant --color never").
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    # print the header comment (everything up to the first non-comment line) as usage
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
fi

DATASET=$1
TOKENIZER_DIR=${2:-}
: "${PYTHON:=python}"
: "${INDEX:=}"
: "${N:=}"
: "${SEED:=0}"
: "${PLOT:=}"
: "${MAX_LEN:=}"
: "${EXTRA_ARGS:=}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# ---
# A prefix is recognised by its token index file; anything else that exists is raw data, which
# the tool renders through the pre-tokenizer's own code (so it needs the tokenizer). A path that
# is neither goes to the tool as a prefix, whose error names the files it expected.
args=()
if [[ -e "${DATASET}_text_document.idx" || "$DATASET" == *_text_document ]]; then
    args+=("$DATASET")
elif [[ -e "$DATASET" ]]; then
    args+=(--input "$DATASET")
else
    args+=("$DATASET")
fi
[[ -n "$TOKENIZER_DIR" ]] && args+=(--tokenizer-model "$TOKENIZER_DIR")
# shellcheck disable=SC2206  # INDEX is a list of numbers, split on purpose
[[ -n "$INDEX" ]] && args+=(--index $INDEX)
[[ -n "$N" ]] && args+=(--random "$N" --seed "$SEED")
[[ -n "$PLOT" ]] && args+=(--plot "$PLOT")
[[ -n "$MAX_LEN" ]] && args+=(--seq-length "$MAX_LEN")

# ---
# One call: the Python tool reads, renders and prints; it writes nothing but the PLOT file.
# shellcheck disable=SC2086  # EXTRA_ARGS is deliberately word-split into flags
"$PYTHON" "$REPO_ROOT/tools/inspect_sft_data.py" "${args[@]}" $EXTRA_ARGS
