#!/usr/bin/env bash
# The GPU proof of issue 21 on a GPU machine, in one command (at most 8 minutes on one H100/H200):
# installs the wheels in .whl/ (benchmarks/gpu_proof_wheels.sh), then runs every step of
# benchmarks/gpu_proof.py on CUDA, with the profile's trace kept. The summary table is printed last.
#
# Usage: bash benchmarks/gpu_proof.sh [more benchmarks/gpu_proof.py flags]
# Environment: OUT (results; default: $OUT when set, as on the lent machine, else runs/gpu_proof),
#              WHEELS (default <repo>/.whl), PYTHON (default python3)
# On the lent machine (the `run` tool, carry [".whl"]):
#   set -o pipefail; bash benchmarks/gpu_proof.sh 2>&1 | tee $OUT/console.log
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${OUT:=$REPO/runs/gpu_proof}"
: "${WHEELS:=$REPO/.whl}"
: "${PYTHON:=python3}"
export PYTHONUNBUFFERED=1

args=(--device cuda --out "$OUT" --trace --site-pth)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  args+=(--wheels "$WHEELS")
else
  echo "note: no wheels in $WHEELS (benchmarks/gpu_proof_wheels.sh fetches them); using what is installed"
fi
exec "$PYTHON" "$REPO/benchmarks/gpu_proof.py" "${args[@]}" "$@"
