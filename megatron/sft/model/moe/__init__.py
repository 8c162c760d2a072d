"""Mixture-of-experts: ``experts`` (the ``--moe-experts-impl`` choices and the grouped linear),
``grouped_mm`` (the grouped-mm experts module), ``settings`` (the run's MoE checks and
megatron-core config overrides) and ``metrics`` (per-layer routing statistics for the logs)."""
