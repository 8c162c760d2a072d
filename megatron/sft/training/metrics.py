"""Throughput accounting: model FLOPs per iteration, TFLOP/s per GPU and MFU (pure), and the
optional TensorBoard / Weights & Biases sinks."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from megatron.sft.bridge.model_shape import ModelShape

#: dense bf16 peak TFLOP/s per GPU, by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def _mlp_weights_per_token(shape: ModelShape, layer: int) -> float:
    """Multiply-adds of one layer's MLP for one token: SwiGLU's three matrices; on a MoE layer
    only what a token activates: its top-k routed experts, the router, the shared expert and
    its one-output gate."""
    h, moe = shape.hidden_size, shape.moe
    if moe is None or not moe.is_moe_layer(layer):
        return 3.0 * h * shape.ffn_hidden_size
    active = moe.top_k * 3.0 * h * moe.ffn_hidden_size + h * moe.num_experts
    if moe.shared_expert_ffn_hidden_size:
        active += 3.0 * h * moe.shared_expert_ffn_hidden_size
        if moe.shared_expert_gate:
            active += h
    return active


def _matmul_flops_per_token(shape: ModelShape) -> float:
    """Forward FLOPs of every weight matmul for one token: QKV, output projection, the MLP
    (active parameters only on MoE layers) and the LM head (2 FLOPs per multiply-add)."""
    h, q, kv = shape.hidden_size, shape.dim("q"), shape.dim("kv")
    attention = h * (q + 2 * kv) + q * h
    layers = sum(attention + _mlp_weights_per_token(shape, i) for i in range(shape.num_layers))
    return 2.0 * (layers + shape.vocab_size * h)


def training_flops(shape: ModelShape, document_lengths: Sequence[int]) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward) over documents of
    these lengths, packed or not.

    Attention is charged per document, causal: a document of ``l`` tokens costs
    ``2 x 2 x l^2/2 x (heads x head_dim)`` per layer (scores and weighted sum, half the square),
    so packing many short samples in a row is not credited with one long sequence's quadratic
    work. Padding is not counted. A full activation recompute adds one more forward, which MFU
    conventions do not count as useful work.

    Example: two documents of 3 and 1 tokens cost 4 tokens of matmuls and ``3^2 + 1^2 = 10``
    token pairs of attention.
    """
    tokens = float(sum(int(n) for n in document_lengths))
    squares = float(sum(int(n) * int(n) for n in document_lengths))
    attention = 2.0 * shape.num_layers * shape.dim("q") * squares
    return 3.0 * (_matmul_flops_per_token(shape) * tokens + attention)


def training_flops_per_token(shape: ModelShape, seq_length: int) -> float:
    """:func:`training_flops` per token when one document fills each row of ``seq_length``."""
    return training_flops(shape, [seq_length]) / seq_length


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
            if record.get("generations"):  # --eval-generate: one text summary per step
                from megatron.sft.training.eval_generation import text_summary

                self.tb.add_text("eval/generations", text_summary(record["generations"]), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
