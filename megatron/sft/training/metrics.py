"""Throughput accounting: model FLOPs per iteration, TFLOP/s per GPU and MFU (pure), and the
optional TensorBoard / Weights & Biases sinks."""

from __future__ import annotations

from typing import Any, Optional

from megatron.sft.bridge.model_shape import ModelShape

#: dense bf16 peak TFLOP/s per GPU, by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def training_flops_per_token(shape: ModelShape, seq_length: int, recompute_full: bool = False
                             ) -> float:
    """Model FLOPs for one token of one training step (forward + backward = 3x forward; a full
    activation recompute adds one more forward, which MFU conventions do not count as useful
    work, so it is reported separately by callers if needed).

    Forward per token: 2 x every matmul weight (QKV, output projection, SwiGLU's three
    matrices, the LM head) plus causal attention's scores and weighted sum,
    2 x 2 x (s/2) x (heads x head_dim) per layer. Packed sequences are charged as if one
    sample filled the row (an upper bound on attention work; its share is small at 4k).
    """
    h, q, kv = shape.hidden_size, shape.dim("q"), shape.dim("kv")
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * shape.ffn_hidden_size
    matmul = 2 * (shape.num_layers * per_layer + shape.vocab_size * h)
    attention = 2 * 2 * shape.num_layers * (seq_length / 2) * q
    del recompute_full  # MFU counts useful model FLOPs only
    return 3.0 * (matmul + attention)


def peak_tflops(device_name: str, override: Optional[float] = None) -> Optional[float]:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


class MetricSinks:
    """TensorBoard and/or W&B, created only when asked; missing packages fail at start."""

    def __init__(self, tensorboard_dir: Optional[str], wandb_project: Optional[str],
                 config: dict[str, Any]):
        self.tb = None
        self.wandb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard-dir needs the tensorboard package: "
                                 "pip install tensorboard") from None
            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError("--wandb-project needs the wandb package: pip install wandb "
                                 "(set WANDB_MODE=offline on machines without internet)") from None
            self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, record: dict[str, Any]) -> None:
        step = record["iteration"]
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"train/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
