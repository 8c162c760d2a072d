"""One ParallelLayout validates every bad combination, with the message each entry point gave
before it existed: the converter tools' ``TP=3`` spelling and the trainer's flag spelling. Plus
the arithmetic the per-rank questions rest on (metadata round trip, batch cut, file owners)."""

import pytest

from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.model_shape import MoEShape
from megatron.sft.runtime.layout import (
    FLAGS,
    SHORT,
    LayoutError,
    ParallelLayout,
    microbatch_rows,
)
from megatron.sft.runtime.parallel_dims import ParallelDims


def _shape(layers=4, heads=4, groups=2, ffn=96, moe=None):
    import dataclasses

    shape = get_architecture("LlamaForCausalLM").shape(dict(
        architectures=["LlamaForCausalLM"], num_hidden_layers=layers, hidden_size=64,
        intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=groups,
        vocab_size=100))
    return dataclasses.replace(shape, moe=moe)


MOE = MoEShape(num_experts=6, top_k=2, ffn_hidden_size=30, layers=(0, 1, 2, 3))


@pytest.mark.parametrize("layout, kwargs, message", [
    # converter / reshard (SHORT): the messages test_bad_input.py and the layout tests match
    (ParallelLayout(3, 1), dict(shape=_shape()), "TP=3 does not divide num_attention_heads=4"),
    (ParallelLayout(1, 3), dict(shape=_shape()), "PP=3 does not divide num_hidden_layers=4"),
    (ParallelLayout(1, 2, 4), dict(shape=_shape()),
     "PP=2 x VPP=4 does not divide num_hidden_layers=4"),
    (ParallelLayout(2, 1), dict(shape=_shape(heads=6, groups=3, ffn=66)),
     "TP=2 and num_key_value_heads=3: one must divide"),
    (ParallelLayout(2, 1), dict(shape=_shape(ffn=95)), "TP=2 does not divide intermediate_size=95"),
    (ParallelLayout(1, 1, 2), dict(shape=_shape()), "virtual pipeline stages need PP >= 2"),
    (ParallelLayout(3, 1), dict(shape=_shape()), r"Valid TP sizes: \[1, 2, 4\]; valid PP"),
    (ParallelLayout(0, 1), dict(shape=_shape()), r"sizes must be >= 1 \(got TP=0\)"),
    (ParallelLayout(2, 1), dict(world_size=3),
     "world size 3 is not divisible by TP=2 x PP=1; launch a multiple of 2 processes"),
    (ParallelLayout(1, 1, ep=4), dict(shape=_shape(moe=MOE)), "EP=4 does not divide num_experts=6"),
    (ParallelLayout(1, 1, ep=2), dict(shape=_shape()), "EP=2: this model has no experts"),
    (ParallelLayout(1, 1, ep=2, etp=4), dict(shape=_shape(moe=MOE)),
     "ETP=4 does not divide the experts' intermediate size 30"),
    (ParallelLayout(1, 1, ep=4), dict(world_size=6),
     "world size 6 is not divisible by ETP=1 x EP=4 x PP=1"),
    (ParallelLayout(1, 1, cp=4), dict(world_size=6),
     "world size 6 is not divisible by TP=1 x PP=1 x CP=4"),
    # trainer (FLAGS): the messages test_arguments.py matches
    (ParallelLayout(2, 1), dict(world_size=3, spelling=FLAGS),
     "world size 3 is not divisible by --tensor-model-parallel-size 2 x "
     "--pipeline-model-parallel-size 1; launch a multiple of 2 processes"),
    (ParallelLayout(1, 2), dict(num_layers=3, spelling=FLAGS),
     "num_layers 3 is not divisible by --pipeline-model-parallel-size 2"),
    # Megatron-FSDP: megatron-core's device mesh has no pipeline dimension
    (ParallelLayout(1, 2, fsdp="optim_grads_params"), dict(),
     "FSDP=optim_grads_params with PP=2: megatron-core's Megatron-FSDP does not support pipeline "
     "parallelism; use PP=1"),
    (ParallelLayout(2, 2, 2, fsdp="optim"), dict(spelling=FLAGS),
     "--use-megatron-fsdp --data-parallel-sharding-strategy optim with "
     "--pipeline-model-parallel-size 2: megatron-core's Megatron-FSDP does not support pipeline "
     "parallelism .* use --pipeline-model-parallel-size 1 .* or drop --use-megatron-fsdp"),
    (ParallelLayout(1, 1, fsdp="zero3"), dict(),
     "FSDP=zero3: use one of no_shard, optim, optim_grads, optim_grads_params"),
    (ParallelLayout(1, 1, cp=2, fsdp="optim_grads_params"), dict(),
     "FSDP=optim_grads_params with CP=2: fully sharded data parallel is proven here with TP and "
     "DP only; drop CP=2"),
    (ParallelLayout(1, 1, ep=2, fsdp="optim"), dict(spelling=FLAGS),
     "--use-megatron-fsdp --data-parallel-sharding-strategy optim with "
     "--expert-model-parallel-size 2: .* or use the distributed optimizer instead of FSDP"),
])
def test_one_validator_for_every_bad_combination(layout, kwargs, message):
    with pytest.raises(LayoutError, match=message):
        layout.validate(**kwargs)


@pytest.mark.parametrize("args, spelling, message", [
    ((1, 1, 2, 8), SHORT, "virtual pipeline stages need PP >= 2"),
    ((1, 2, 3, 8), SHORT, "3 layers per virtual pipeline stage x PP 2 does not divide the "
                          "model's 8 layers"),
    ((1, 1, 2, 8), FLAGS, "--num-layers-per-virtual-pipeline-stage needs "
                          "--pipeline-model-parallel-size >= 2"),
    ((1, 2, 3, 8), FLAGS, "num_layers 8 is not divisible by --pipeline-model-parallel-size 2 x "
                          "--num-layers-per-virtual-pipeline-stage 3"),
])
def test_virtual_stage_flags(args, spelling, message):
    with pytest.raises(LayoutError, match=message):
        ParallelLayout.from_flags(*args, spelling=spelling)


def test_good_layouts_pass_and_describe_themselves():
    ParallelLayout(4, 2, 2).validate(_shape(layers=8), world_size=16)
    ParallelLayout(2, 1, ep=3, etp=1).validate(_shape(moe=MOE), world_size=6)
    assert ParallelLayout(2, 1).describe() == "TP2 PP1"
    assert ParallelLayout(1, 2, 2, cp=2, ep=4).describe() == "TP1 PP2 VPP2 CP2 EP4"
    assert ParallelLayout(2, 2, cp=2).data_parallel_size(16) == 2


def test_metadata_keeps_the_files_layout_and_reads_old_checkpoints():
    layout = ParallelLayout(2, 2, 2, cp=4, ep=2, etp=1)
    meta = layout.to_metadata()
    assert meta == dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                        virtual_pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                        expert_tensor_parallel_size=1)
    assert ParallelLayout.from_metadata(meta) == layout.for_checkpoint() == \
        ParallelLayout(2, 2, 2, ep=2, etp=1)
    old = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
               virtual_pipeline_model_parallel_size=None)  # before expert parallelism
    assert ParallelLayout.from_metadata(old) == ParallelLayout(2, 1)


def test_fsdp_changes_neither_files_nor_process_groups():
    sharded = ParallelLayout(2, 1, fsdp="optim_grads_params")
    sharded.validate(_shape(), world_size=4)
    assert sharded.describe() == "TP2 PP1 FSDP(optim_grads_params)"
    assert sharded.for_checkpoint() == ParallelLayout(2, 1)
    assert sharded.to_megatron() == ParallelLayout(2, 1).to_megatron()
    assert "fsdp" not in str(sharded.to_metadata())
    ParallelLayout(2, 1).check_same_files(sharded)


def test_files_do_not_depend_on_context_parallelism():
    ParallelLayout(2, 1, cp=2).check_same_files(ParallelLayout(2, 1))
    with pytest.raises(LayoutError, match="checkpoint is split TP=2 PP=1 VPP=None but this run "
                                          "uses TP=1 PP=1 VPP=None; run with the checkpoint's "
                                          "sizes or re-split it"):
        ParallelLayout(1, 1).check_same_files(ParallelLayout(2, 1))
    assert ParallelLayout(2, 2).rank_dir_name(1, 1) == "mp_rank_01_001"
    assert ParallelLayout(2, 1, ep=2).rank_dir_name(1, 0, 1) == "mp_rank_01_001"
    assert ParallelLayout(2, 2, ep=2).rank_dir_name(1, 1, 1) == "mp_rank_01_001_001"
    assert ParallelLayout(1, 1, ep=3).local_experts(_shape(moe=MOE), 2) == range(4, 6)


def test_the_documented_batch_cut():
    assert microbatch_rows(1, 4, 1, 0, 2) == [[4], [5]]
    assert microbatch_rows(1, 4, 1, 1, 2) == [[6], [7]]
    dims = ParallelDims(ParallelLayout(1, 1), world_size=2, rank=1, tp_rank=0, pp_rank=0,
                        dp_rank=1, dp_size=2)
    assert dims.microbatch_rows(1, 4, 1) == [[6], [7]] and dims.is_logger


@pytest.mark.parametrize("dp_rank, cp_rank, writes", [(0, 0, True), (1, 0, False),
                                                      (0, 1, False)])
def test_one_writer_per_file_even_with_context_parallel_ranks(dp_rank, cp_rank, writes):
    dims = ParallelDims(ParallelLayout(1, 1, cp=2), world_size=4, rank=0, tp_rank=0,
                        pp_rank=0, dp_rank=dp_rank, dp_size=2, cp_rank=cp_rank)
    assert dims.writes_rank_file is writes


def test_whole_experts_with_tp_use_megatron_lms_files():
    """ETP=1 with TP=2: Megatron-LM's files are written by expert-data-parallel rank 0, the
    ranks ``0 .. EP-1`` of a stage; rank ``l`` is TP rank ``l mod TP`` and EP rank ``l``."""
    layout = ParallelLayout(2, 1, ep=4, etp=1)
    layout.check_files()
    assert layout.whole_experts and not ParallelLayout(2, 1, ep=4).whole_experts
    assert layout.file_ranks() == [(0, 0, 0), (1, 0, 1), (0, 0, 2), (1, 0, 3)]
    assert [layout.rank_dir_name(*r) for r in layout.file_ranks()] == [
        "mp_rank_00_000", "mp_rank_01_001", "mp_rank_00_002", "mp_rank_01_003"]
    # a reader of EP rank 3 takes TP rank 1 from its own file, TP rank 0 from EP rank 0's
    assert [layout.reader_ep_rank(t, 3) for t in (0, 1)] == [0, 3]
    assert len(ParallelLayout(2, 2, ep=2).file_ranks()) == 8  # TP = ETP: every (t, p, e)
    with pytest.raises(LayoutError, match="ETP=1 with TP=4 and EP=2: .* use EP=4 or ETP=4"):
        ParallelLayout(4, 1, ep=2, etp=1).check_files()
    with pytest.raises(LayoutError, match="--expert-tensor-parallel-size 2 with "
                                          "--tensor-model-parallel-size 4: .*use "
                                          "--expert-tensor-parallel-size 4, "
                                          "--expert-tensor-parallel-size 1 or leave it unset"):
        ParallelLayout(4, 1, ep=2, etp=2).check_files(FLAGS)
