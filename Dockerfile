# Megatron-SFT GPU image: NVIDIA's PyTorch container already carries CUDA, a matching torch,
# Transformer Engine and Apex; we add only our pure-Python requirements on top.
#
#   docker build -t megatron-sft .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v "$PWD":"$PWD" -w "$PWD" -it --rm megatron-sft
#   docker run --gpus all --rm megatron-sft python tools/self_check.py   # TE/Apex/mcore + GPU model
#
# Any recent NVIDIA PyTorch container works: megatron-core 0.16 needs torch >= 2.6 and Python 3.10-3.12.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/megatron-sft
COPY requirements.txt .
# Constrain torch (and the TE/Apex builds compiled against it) to the container's versions, so
# no requirement can pull a different torch from PyPI over them.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt -r requirements.txt \
 && python -c "import torch, megatron.core, transformer_engine; print('torch', torch.__version__, 'mcore', megatron.core.__version__)"

COPY . .
ENV PYTHONPATH=/opt/megatron-sft
CMD ["python", "tools/self_check.py"]
