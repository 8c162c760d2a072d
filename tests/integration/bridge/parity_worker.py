"""torchrun worker: for each (checkpoint, HF dir) pair, build the megatron-core model across the
ranks from the checkpoint and write the max |logits - transformers logits| to a JSON file.

Pairs may be at different TP x PP x VPP layouts that fit the world (the rest of the ranks are
data-parallel replicas): megatron-core's parallel state is rebuilt whenever the layout changes,
so one process group serves them all (starting processes is the expensive part of these tests
on a 2-core CI machine).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main() -> None:
    pairs_file, out_file = sys.argv[1], sys.argv[2]
    pairs = json.loads(Path(pairs_file).read_text())
    import torch

    from megatron.sft.bridge.checkpoint_io import iteration_dir, read_metadata
    from megatron.sft.runtime.distributed import initialize_distributed

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from transformers import AutoModelForCausalLM

    from megatron.sft.runtime.parallel_dims import parallel_dims_or_none
    from megatron.sft.training.forward_logits import pipeline_logits
    from megatron.sft.model.builder import build_model_from_checkpoint

    results = {}
    for pair in pairs:
        layout = read_metadata(iteration_dir(pair["ckpt"])).layout
        current = parallel_dims_or_none()
        if current is not None and current.layout != layout:
            from megatron.sft.runtime.distributed import release_model_parallel

            release_model_parallel()  # closes the gloo groups and forgets the parallel dims
            get_cuda_rng_tracker().reset()
        initialize_distributed(layout)
        chunks, meta, _ = build_model_from_checkpoint(pair["ckpt"], seq_length=24)
        vocab = meta.hf_config["vocab_size"]
        tokens = torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(7))
        nmb = meta.layout.pp if meta.layout.vpp else 2
        logits = pipeline_logits(chunks, tokens, vocab, num_microbatches=nmb)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0 \
                and ps.get_data_parallel_rank() == 0:  # one rank per layout compares
            hf = AutoModelForCausalLM.from_pretrained(pair["hf"], dtype=torch.float32,
                                                      attn_implementation="eager")
            with torch.no_grad():
                ref = hf(tokens).logits
            results[pair["name"]] = {"max_abs_diff": (logits - ref).abs().max().item(),
                                     "ref_abs_max": ref.abs().max().item(),
                                     "shape": list(logits.shape)}
    # Which rank holds a result depends on the layout (the last pipeline stage): gather them.
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() == 0:
        Path(out_file).write_text(json.dumps({k: v for part in gathered for k, v in part.items()}))


if __name__ == "__main__":
    main()
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed(wait_for_peers=True)
