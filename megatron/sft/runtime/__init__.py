"""Process-level runtime: torch.distributed + megatron-core parallel state, CPU mode, layer specs."""
