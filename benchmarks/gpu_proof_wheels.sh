#!/usr/bin/env bash
# Download the wheels the lent GPU machine needs for benchmarks/gpu_proof.sh into .whl/ (at most
# 64 MiB; the `run` tool carries it with carry [".whl"]). That machine has no internet.
#
# Usage: bash benchmarks/gpu_proof_wheels.sh [DEST]      (default DEST: <repo>/.whl, git-ignored)
# Environment: PYTHON (default python3: any python with pip, on any platform: the download names
#              the target's platform), EXTRA_WHEELS (more NAME==VERSION specs, space-separated)
#
# What the machine lacks (/work/.library/device/KINDS.md, "nvidia-h200"; Python 3.12.3, torch
# 2.11.0+cu130, x86-64, glibc of Ubuntu 24.04):
#   megatron-core==0.16.1  (requirements-megatron-core.txt). NOT pure Python: its wheels carry a
#                          compiled dataset helper (Root-Is-Purelib: false, tags
#                          cp312-cp312-manylinux_2_24/2_28_x86_64), hence --python-version 3.12,
#                          --implementation cp and the manylinux --platform list below. ~2.6 MB.
#                          Its requirements (torch, numpy, packaging) are on the machine.
# Everything else the proof imports is there already: transformers, huggingface-hub,
# safetensors, tokenizers, numpy, pyyaml, tqdm, pyarrow, tensorboard, matplotlib, packaging,
# einops (megatron-core's attention imports it), peft, pytest, pytest-xdist, hypothesis,
# setuptools. Not there and not needed: datasets (only scripts/data/download_hf_dataset.py, which
# needs the internet anyway) and zstandard (only .zst inputs). No Transformer Engine: the proof
# measures varlen, flex and sdpa.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$REPO/.whl}
: "${PYTHON:=python3}"
: "${EXTRA_WHEELS:=}"
PIN=$(grep -E '^megatron-core==' "$REPO/requirements-megatron-core.txt")

rm -rf "$DEST"
mkdir -p "$DEST"
# shellcheck disable=SC2086  # EXTRA_WHEELS is a list of specs
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "$PIN" $EXTRA_WHEELS

ls -l "$DEST"
size=$(du -sm "$DEST" | cut -f1)
if (( size > 64 )); then
  echo "error: $DEST holds ${size} MiB; the run tool carries at most 64 MiB in all" >&2
  exit 1
fi
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 && ! git -C "$REPO" check-ignore -q "$DEST"; then
  echo "warning: git does not ignore $DEST; the run tool carries ignored paths only" >&2
fi
echo "ok: ${size} MiB in $DEST; on the GPU machine: bash benchmarks/gpu_proof.sh (carry [\".whl\"])"
