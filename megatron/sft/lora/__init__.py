"""LoRA: low-rank adapters on a frozen base, as one package between ``training`` (which builds
the model and saves runs) and ``bridge`` (which reads checkpoints as HF tensors).

Modules:

- ``settings``     the ``--lora-*`` flags, the four megatron-core targets, adapter names [pure]
- ``bases``        which megatron-core / Transformer Engine linears an adapter can wrap [pure]
- ``adapters``     the adapter module; attach (freezing the base), initialise, load
- ``split``        adapters between TP shards and the PEFT form, names from the architecture's
                   weight rules [pure]
- ``run_format``   ``lora.json``: which base a run adapts; the one base check
- ``merge``        a run read as its merged model (``open_checkpoint`` for any checkpoint)
- ``peft_export``  a run's adapters as an HF PEFT adapter directory
- ``peft_experts`` routed experts' adapters in peft's fused form [pure]
- ``reshard``      any checkpoint at another layout; a LoRA run stays adapters-only

``bridge`` never imports this package: a LoRA run is read through ``merge.LoRARunReader``, a
``bridge.reader.CheckpointReader`` whose stages are the base with the adapters merged.
"""
