#!/usr/bin/env bash
# Re-split a Megatron checkpoint for another TP x PP layout (weights and iteration; no optimizer).
#
# Usage: scripts/checkpoints/reshard_checkpoint.sh CKPT_DIR OUT_DIR TP PP [ITER]
# Environment: VPP_LAYERS=N (layers per virtual stage), FORCE=1, PYTHON (default python3)
set -euo pipefail

if [[ $# -lt 4 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
: "${PYTHON:=python3}"
: "${FORCE:=0}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

args=(--load-dir "$1" --save-dir "$2" --target-tensor-parallel-size "$3"
      --target-pipeline-parallel-size "$4")
[[ $# -ge 5 ]] && args+=(--iteration "$5")
[[ -n "${VPP_LAYERS:-}" ]] && args+=(--target-num-layers-per-virtual-pipeline-stage "$VPP_LAYERS")
[[ "$FORCE" == "1" ]] && args+=(--force)

# --- reshard through the layout-free HF tensor form
exec "$PYTHON" "$REPO/tools/reshard_checkpoint.py" "${args[@]}"
