"""Context and sequence parallelism's bad input fails before the first step, naming the values
and the fix: a row length that does not cut into 2·CP chunks (x TP with SP), a CP that does not
fit the world with TP x PP, a backend without CP (or not on this device), rows that cannot be
cut."""

import pytest
import torch

from megatron.sft.model.attention import get_attention_backend
from megatron.sft.model.context_parallel.split import ContextParallelError
from megatron.sft.model.layer_impl import LayerImplError, resolve_layer_impl
from megatron.sft.training.arguments import TrainConfig, build_parser


def _cfg(**kw):
    return TrainConfig(load="/c", data_path="/d", train_iters=1, **kw)


@pytest.mark.parametrize("kw, world, message", [
    (dict(context_parallel_size=2, seq_length=4098), 2,
     r"--seq-length 4098 is not divisible by 2 x --context-parallel-size 2 = 4 .*use "
     r"--seq-length 4100 or --seq-length 4096"),
    (dict(context_parallel_size=2, tensor_model_parallel_size=2, sequence_parallel=True,
          seq_length=4100), 4,
     r"2 x --context-parallel-size 2 x --tensor-model-parallel-size 2 \(--sequence-parallel\) "
     r"= 8"),
    (dict(tensor_model_parallel_size=2, sequence_parallel=True, seq_length=127), 2,
     r"--seq-length 127 is not divisible by --tensor-model-parallel-size 2"),
    (dict(context_parallel_size=2, tensor_model_parallel_size=2, global_batch_size=4), 6,
     r"world size 6 is not divisible by --tensor-model-parallel-size 2 x "
     r"--pipeline-model-parallel-size 1 x --context-parallel-size 2; launch a multiple of 4"),
    (dict(context_parallel_size=2, pipeline_model_parallel_size=2, attention_backend="te"), 4,
     r"--attention-backend te with --context-parallel-size > 1 and "
     r"--pipeline-model-parallel-size > 1: .*use --attention-backend varlen"),
    (dict(context_parallel_size=2, attention_backend="dense"), 2,
     r"--attention-backend dense has no context parallelism \(--context-parallel-size 2\); use "
     r"--attention-backend .*sdpa"),
])
def test_bad_layouts_are_clear_errors(kw, world, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**kw).validate(world, 4)


def test_good_layouts_pass_and_the_flag_is_megatron_lms():
    _cfg(context_parallel_size=2, seq_length=4096).validate(2, 4)
    _cfg(context_parallel_size=2, tensor_model_parallel_size=2, sequence_parallel=True,
         seq_length=4096, lora_rank=4).validate(8, 4)
    args = build_parser().parse_args(["--context-parallel-size", "4", "--chunked-loss", "off"])
    assert args.context_parallel_size == 4 and args.chunked_loss == "off"
    assert _cfg(context_parallel_size=4).parallel_layout().cp == 4


def test_backend_choice_at_cp_and_on_this_device():
    assert resolve_layer_impl("local", "auto", "cpu", cp=2).attention == "sdpa"
    assert resolve_layer_impl("local", "auto", "cuda", cp=2).attention in ("varlen", "flex")
    with pytest.raises(LayerImplError, match="varlen runs on CUDA only"):
        resolve_layer_impl("local", "varlen", "cpu", cp=2)
    with pytest.raises(LayerImplError, match="dense has no context parallelism"):
        resolve_layer_impl("local", "dense", "cpu", cp=2)
    assert [s.name for s in map(get_attention_backend, ("te", "varlen", "flex", "sdpa", "dense"))
            if s.supports_cp] == ["te", "varlen", "flex", "sdpa"]


def test_rows_that_cannot_be_cut_are_refused_by_the_inputs():
    cu = torch.tensor([[0, 4, 10]])
    with pytest.raises(ContextParallelError, match="a row of 10 tokens cannot be cut into "
                                                   "2 x CP = 4 equal chunks; use a "
                                                   "--seq-length divisible by 4"):
        get_attention_backend("sdpa").attention_inputs(cu, 1, 10, cp_size=2, cp_rank=0)
