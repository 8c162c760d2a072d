"""Everything that builds or computes the model, between the trainer and the process runtime.

- ``attention/``        packed-row core attention: document segments, the backend registry
                        behind ``--attention-backend``, the kernels, ``PackedCoreAttention``
- ``context_parallel/`` the CP split of rows into pieces, the CP kernels, the K/V all-gather
- ``moe/``              experts implementations (``--moe-experts-impl``), MoE settings and
                        per-layer routing metrics
- ``layer_impl``, ``block_spec``, ``norms``, ``tp_attributes``: the layer spec megatron-core
  builds from, local or Transformer Engine
- ``config``, ``builder``: ``TransformerConfig`` from a checkpoint's shape, and the model chunks
  built from a converted checkpoint or straight from an HF directory

Imports flow down: ``training`` -> ``model`` -> ``lora`` / ``bridge`` -> ``runtime``
(``tests/unit/test_layering.py``).
"""
