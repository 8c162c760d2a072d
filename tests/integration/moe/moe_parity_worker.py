"""torchrun worker: Mixture-of-Experts logits vs transformers for many (checkpoint, layout,
experts implementation, settings) cases in one launch.

``moe_parity_worker.py CASES.json OUT.json``; each case: ``name``, ``ckpt``, ``hf``, ``experts``
(``grouped_mm`` | ``sequential``) and, for negative controls, optional ``overrides``
(``TransformerConfig`` fields) and ``zero`` (parameters whose name contains it are zeroed). Cases run grouped by their checkpoint's layout; between layouts the
model-parallel state is rebuilt on the same process group (starting processes is what costs on
a 2-core machine). Rank 0 writes ``{name: {max_abs_diff, ref_abs_max}}``.
"""

import json
import sys
from itertools import groupby
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    import torch
    import torch.distributed as dist

    from megatron.sft.bridge.checkpoint_io import iteration_dir, read_metadata
    from megatron.sft.runtime.distributed import initialize_distributed
    from megatron.sft.runtime.layer_impl import LayerImpl
    from megatron.sft.runtime.parallel_dims import parallel_dims, set_parallel_dims

    layout_of = {c["ckpt"]: read_metadata(iteration_dir(c["ckpt"])).layout for c in cases}
    results, references = {}, {}
    for layout, group in groupby(cases, key=lambda c: layout_of[c["ckpt"]]):
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
            set_parallel_dims(None)
        initialize_distributed(layout)
        from megatron.sft.training.forward_logits import pipeline_logits
        from megatron.sft.training.model_builder import build_model_from_checkpoint

        for case in group:
            impl = LayerImpl("local", "sdpa", case["experts"])
            chunks, meta, _ = build_model_from_checkpoint(case["ckpt"], impl=impl, seq_length=24,
                                                          **case.get("overrides", {}))
            with torch.no_grad():
                for model in chunks:
                    for pname, param in model.named_parameters():
                        if case.get("zero") and case["zero"] in pname:
                            param.zero_()
            vocab = meta.hf_config["vocab_size"]
            tokens = torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(7))
            nmb = layout.pp if layout.vpp else 2
            logits = pipeline_logits(chunks, tokens, vocab, num_microbatches=nmb)
            dims = parallel_dims()
            mine = logits if logits is not None and dims.tp_rank == 0 and dims.dp_rank == 0 \
                else None
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            if dist.get_rank() == 0:
                got = next(g for g in gathered if g is not None)
                if case["hf"] not in references:
                    from transformers import AutoModelForCausalLM

                    hf = AutoModelForCausalLM.from_pretrained(case["hf"], dtype=torch.float32,
                                                              attn_implementation="eager")
                    with torch.no_grad():
                        references[case["hf"]] = hf(tokens).logits
                ref = references[case["hf"]]
                results[case["name"]] = {"max_abs_diff": (got - ref).abs().max().item(),
                                         "ref_abs_max": ref.abs().max().item(),
                                         "layout": layout.describe()}
            del chunks
    if dist.get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed(wait_for_peers=True)
