"""Megatron-SFT: supervised fine-tuning of open LLMs on megatron-core.

`megatron/` deliberately has no ``__init__.py``: it is a namespace package shared with the pinned
``megatron-core`` wheel, so ``megatron.core`` (pip) and ``megatron.sft`` (this repository) import
side by side without vendoring Megatron-LM.
"""

__version__ = "0.1.0"
