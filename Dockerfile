# Megatron-SFT GPU image: NVIDIA's PyTorch container already carries CUDA, a matching torch,
# Transformer Engine and Apex; we add only our pure-Python requirements and megatron-core on top.
#
#   docker build -t megatron-sft .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:24.12-py3 -t megatron-sft .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v "$PWD":"$PWD" -w "$PWD" -it --rm megatron-sft
#   docker run --gpus all --rm megatron-sft python tools/self_check.py   # TE/Apex/mcore + GPU model
#
# The default base is the newest container whose torch satisfies megatron-core 0.16.1's
# torch>=2.6.0 as pip reads it (25.02 and later ship 2.7.0a0 or newer; 24.12/25.01 ship
# 2.6.0a0+..., a pre-release that PEP 440 orders before 2.6.0). Bases down to 24.11 are accepted
# too, through the same installer: README "0. Container" has the table, and
# tests/unit/test_container_requirements.py checks this default against every torch requirement.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.06-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/megatron-sft
# Only what the installer reads, so the pip layer is rebuilt only when the requirements change
# (the version checks import nothing but the standard library and packaging).
COPY requirements.txt requirements-megatron-core.txt ./
COPY scripts/setup/ scripts/setup/
# The installer users run in a container: it pins the container's torch, torchvision, Triton, TE,
# Apex and flash-attn so pip can never replace them, refuses a torch older than megatron-core's
# requirement, and installs megatron-core without dependencies. Then the build fails unless
# Transformer Engine imports next to megatron-core, and prints the versions that shipped.
RUN PIP_NO_CACHE_DIR=1 PYTHON=python bash scripts/setup/install_requirements.sh \
 && python -c "import torch, megatron.core, transformer_engine as te; \
print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, \
      '| transformer-engine', getattr(te, '__version__', 'present'))"

COPY . .
ENV PYTHONPATH=/opt/megatron-sft
CMD ["python", "tools/self_check.py"]
