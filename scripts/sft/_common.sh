# Sourced by the recipes in scripts/sft/ (never run by itself): what every recipe needs the same
# way, written once. A recipe reads top to bottom as its own choices (model, data, parallelism,
# optimisation); the plumbing around them lives here.
#
# After sourcing: REPO, ASSETS_DIR, PYTHON are set (each an environment override), and
#   sft_usage SCRIPT MODE       prints SCRIPT's header comment and exits 2 unless MODE is "train"
#   sft_cluster_defaults        torchrun's multi-node rendezvous variables, with one-node defaults
#   sft_pick_load CKPT SAVE_DIR HF_SUGGESTION CONVERT_CMD DOWNLOAD_CMD
#                               sets LOAD: the run's own latest checkpoint, else HF_MODEL (read
#                               directly), else the conversion CKPT; exits 2 naming the fix
#   sft_require_data PREFIX HINT  exits 2 unless PREFIX_text_document.idx exists
#   sft_launch ARGS...          execs tools/train_sft.py under torchrun on every GPU of every node

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${ASSETS_DIR:=$REPO/assets}"
: "${PYTHON:=python3}"

sft_usage() {
  # The usage text is the recipe's own header, so the two cannot drift apart.
  if [[ "${2:-}" != "train" ]]; then
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
    exit 2
  fi
}

sft_cluster_defaults() {
  # Under Slurm or another launcher these come from the job; alone they describe one node.
  : "${GPUS_PER_NODE:=8}"
  : "${NNODES:=1}"
  : "${NODE_RANK:=0}"
  : "${MASTER_ADDR:=localhost}"
  : "${MASTER_PORT:=6000}"
}

sft_pick_load() {
  local ckpt=$1 save=$2 hf_suggestion=$3 convert_cmd=$4 download_cmd=$5
  # Resuming comes first: a re-run of the same command continues where the last one stopped.
  LOAD=${HF_MODEL:-$ckpt}
  if [[ -f "$save/latest_checkpointed_iteration.txt" ]]; then
    LOAD=$save
  elif [[ -n "${HF_MODEL:-}" ]]; then
    if [[ ! -f "$HF_MODEL/config.json" ]]; then
      echo "error: HF_MODEL=$HF_MODEL has no config.json; download it first: $download_cmd" >&2
      exit 2
    fi
  elif [[ ! -f "$ckpt/latest_checkpointed_iteration.txt" ]]; then
    echo "error: no checkpoint at $ckpt; set HF_MODEL=$hf_suggestion to load the HF model directly, or convert first: $convert_cmd" >&2
    exit 2
  fi
}

sft_require_data() {
  if [[ -z "$1" || ! -f "${1}_text_document.idx" ]]; then
    echo "error: no tokenized data at ${1:-(DATA_PATH is empty)}_text_document.idx; $2" >&2
    exit 2
  fi
}

sft_launch() {
  exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    "$REPO/tools/train_sft.py" "$@"
}
