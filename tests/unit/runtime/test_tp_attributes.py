"""The compat shim for megatron-core 0.16's unmarked TP-split weights (built without
initialisation): megatron-core's own layers come out marked as an initialised build marks them."""

import torch

from megatron.sft.model.tp_attributes import mark_tensor_parallel_weights


def test_uninitialised_megatron_layers_get_the_marks_initialisation_gives():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    marks = {}
    for init in (True, False):
        cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                                use_cpu_initialization=True, perform_initialization=init)
        layers = torch.nn.ModuleDict({
            "column": ColumnParallelLinear(8, 16, config=cfg, init_method=torch.nn.init.zeros_,
                                           bias=False, gather_output=False),
            "row": RowParallelLinear(16, 8, config=cfg, init_method=torch.nn.init.zeros_,
                                     bias=False, input_is_parallel=True, skip_bias_add=True)})
        if not init:
            assert not any(getattr(m.weight, "tensor_model_parallel", False)
                           for m in layers.values()), "megatron-core marks them now: drop the shim"
            assert mark_tensor_parallel_weights(layers) == 2
        marks[init] = {k: (m.weight.tensor_model_parallel, m.weight.partition_dim,
                           m.weight.partition_stride) for k, m in layers.items()}
    assert marks[False] == marks[True] == {"column": (True, 0, 1), "row": (True, 1, 1)}
    assert mark_tensor_parallel_weights(layers) == 0  # marked weights are left as they are
