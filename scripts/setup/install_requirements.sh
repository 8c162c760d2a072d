#!/usr/bin/env bash
# Install Megatron-SFT's requirements into one python without ever letting pip replace a torch
# that is already there (the NVIDIA PyTorch container's CUDA build, with Transformer Engine and
# Apex compiled against it), megatron-core included.
#
# Usage: bash scripts/setup/install_requirements.sh [--dry-run] [PIP_ARGS...]
#   --dry-run  print the decision and the pip commands, install nothing
#   PIP_ARGS   more arguments for the requirements step, e.g. -r requirements-dev.txt
#
#   bash scripts/setup/install_requirements.sh          # in the container (or your user account)
#   PYTHON=.venv/bin/python bash scripts/setup/install_requirements.sh -r requirements-dev.txt
#
# Steps: pin the installed torch (and torchvision, Triton, TE, Apex, flash-attn where present) in
# a temporary constraints file; check that torch against megatron-core's torch requirement, by
# release version for NVIDIA's pre-release builds (2.6.0a0+... in NGC 24.12/25.01 counts as
# 2.6.0), and stop with the containers that work if it is too old; pip install requirements.txt
# under the pins; pip install requirements-megatron-core.txt, with --no-deps when torch was
# already there; check megatron-core's own metadata and import it.
# Creates: nothing in the repository (packages in PYTHON's environment).
#
# Environment: PYTHON (default python, else python3). pip's own PIP_* variables apply to every
# step (PIP_QUIET=1, PIP_NO_CACHE_DIR=1, ...), and so do a container's own pins
# (/etc/pip/constraint.txt in NGC 25.03 and later).
set -euo pipefail

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
        exit 0 ;;
esac
: "${PYTHON:=$(command -v python || command -v python3 || echo python)}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Print a command as it would be typed, then run it (unless --dry-run).
run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

# Our version checks, with only the standard library and packaging: nothing is installed yet.
containers() {
    "$PYTHON" "$REPO_ROOT/scripts/setup/containers.py" "$@"
}

# ---
# Decide before installing anything: pin what is installed, check torch against megatron-core.
# Prints the decision and the pins on stderr; stops here (non-zero) when torch is refused.
MODE="$(containers plan --constraints "$WORK/constraints.txt" \
        --requirement-file "$REPO_ROOT/requirements-megatron-core.txt")"
NO_DEPS=()
if [[ $MODE == no-deps ]]; then NO_DEPS=(--no-deps); fi

# ---
# Our requirements never ask for torch; the pins stop anything they pull in from replacing it.
run "$PYTHON" -m pip install -c "$WORK/constraints.txt" -r "$REPO_ROOT/requirements.txt" "$@"

# ---
# megatron-core: without dependencies where torch is installed (pip would reject an NVIDIA
# pre-release torch and fetch another); its other dependencies are in requirements.txt.
run "$PYTHON" -m pip install -c "$WORK/constraints.txt" ${NO_DEPS[@]+"${NO_DEPS[@]}"} \
    -r "$REPO_ROOT/requirements-megatron-core.txt"

# ---
# What got installed: megatron-core's own torch requirement, its other dependencies, the import.
if [[ $DRY_RUN == 1 ]]; then
    printf '+ %q %q verify\n' "$PYTHON" "$REPO_ROOT/scripts/setup/containers.py"
else
    containers verify
fi
