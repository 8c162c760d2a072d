"""How the profile's kernels are classified into categories (pure)."""

from __future__ import annotations

import re


CATEGORIES = ("attention", "GEMMs", "norm/RoPE/SwiGLU elementwise", "loss over the vocabulary",
              "optimizer", "communication", "data", "other")

#: How the profile's time is classified. Each CUDA kernel is described by one line of text: its
#: name, then the names of the CPU ops it was launched from (innermost first), then, for a
#: kernel of the backward pass, the labels of the forward op that made its autograd node (same
#: sequence number). The profiling run labels four regions of our own code with
#: ``record_function``: ``sft::data`` (building and copying the micro-batches),
#: ``sft::attention`` (the core-attention kernel call, so flex's compiled Triton kernels and its
#: block mask count as attention), ``sft::loss`` (the vocabulary-parallel cross-entropy, with
#: the fp32 cast of the logits) and ``sft::optimizer`` (zeroing the gradient buffers, the
#: optimizer step with its gradient norm, clipping and parameter copies, the LR scheduler).
#: The first rule that matches wins; ``name`` rules look at the kernel name only. The LM head's
#: matmul is a GEMM, not loss. On CPU (--tiny) the same rules classify each op's self CPU time.
PROFILE_RULES: tuple[tuple[str, str, str], ...] = (
    ("communication", "name", r"nccl|all_?reduce|all_?gather|reduce_?scatter|sendrecv"),
    ("data", "name", r"memcpy htod|memcpy h2d"),
    ("optimizer", "text", r"sft::optimizer|optimizer\.step|multi_tensor|adam"),
    ("data", "text", r"sft::data"),
    ("loss over the vocabulary", "text",
     r"sft::loss|vocabparallelcrossentropy|cross_entropy|nll_loss"),
    ("attention", "text", r"sft::attention|flash|fmha|sdpa|scaled_dot_product|attention|attn|"
                          r"flex|compiledfunction"),  # flex is the one compiled thing here
    ("communication", "text", r"nccl|c10d::|all_?reduce|all_?gather|reduce_?scatter|gloo"),
    ("GEMMs", "text", r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitk|wgmma|"
                      r"aten::(mm|addmm|bmm|baddbmm|matmul|linear)\b|linearwithgrad"),
    ("other", "name", r"^memset|^memcpy"),
    ("norm/RoPE/SwiGLU elementwise", "text",
     r"elementwise|reduce_kernel|norm|silu|swiglu|rotary|rope|triton|at::native|aten::"),
)


def classify(kernel: str, text: str) -> str:
    """The category of a kernel (or CPU op) from its name and its description line.

    >>> classify("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_NNT", "aten::mm <- aten::linear")
    'GEMMs'
    >>> classify("triton_tem_fused_0", "CompiledFunction <- sft::attention")
    'attention'
    >>> classify("void at::native::vectorized_elementwise_kernel<4>", "aten::mul")
    'norm/RoPE/SwiGLU elementwise'
    >>> classify("Memcpy HtoD (Pageable -> Device)", "aten::copy_ <- sft::data")
    'data'
    """
    for category, field, pattern in PROFILE_RULES:
        if re.search(pattern, (kernel if field == "name" else f"{kernel} <- {text}").lower()):
            return category
    return "other"
