"""Model construction, loss, the training loop and checkpointing on megatron-core."""
