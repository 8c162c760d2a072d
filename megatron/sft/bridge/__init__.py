"""HuggingFace <-> Megatron checkpoint bridge.

Layout: ``architectures/`` holds one declarative table per HF architecture; ``transforms`` holds
the pure tensor math (QKV interleaving, gate/up fusion, TP split, vocab padding); ``layout`` the
pure TP/PP/VPP sharding arithmetic; ``*_io`` modules the file formats; ``convert``/``export``/
``reshard`` compose them.
"""
