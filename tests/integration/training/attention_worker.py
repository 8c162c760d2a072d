"""torchrun worker: the same packed micro-batch through every requested attention backend.

``attention_worker.py SPEC.json``: SPEC holds ``pairs`` (checkpoint + HF dir + name, all of one
TP x PP layout), ``backends``, ``rows`` (document lengths per row; a row whose lengths sum to
less than ``seq_length`` ends in padding) and ``out``.

For each pair and backend: forward and backward of a masked cross-entropy over the real tokens
through megatron-core's pipeline schedule. Written per pair: the max |logits - transformers| per
backend (HF runs each document on its own), and the max |grad_backend - grad_dense| over every
parameter on every rank (dense = megatron-core's own masked-softmax attention).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def packed_batch(rows, seq_length, vocab, seed=3):
    import torch

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (len(rows), seq_length), generator=gen)
    labels = torch.randint(0, vocab, (len(rows), seq_length), generator=gen)
    width = max(len(r) for r in rows) + 1
    cu = torch.full((len(rows), width), -1, dtype=torch.int32)
    positions = torch.zeros(len(rows), seq_length, dtype=torch.long)
    mask = torch.zeros(len(rows), seq_length)
    for b, lengths in enumerate(rows):
        bounds = [0]
        for n in lengths:
            positions[b, bounds[-1]:bounds[-1] + n] = torch.arange(n)
            bounds.append(bounds[-1] + n)
        cu[b, :len(bounds)] = torch.tensor(bounds)
        mask[b, :bounds[-1]] = 1.0
    return tokens, labels, positions, cu, mask


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    from megatron.sft.bridge.checkpoint_io import iteration_dir, read_metadata
    from megatron.sft.runtime.distributed import initialize_distributed

    meta = read_metadata(iteration_dir(spec["pairs"][0]["ckpt"]))
    initialize_distributed(meta.layout)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron.sft.bridge.architectures import shape_of
    from megatron.sft.model.layer_impl import LayerImpl
    from megatron.sft.training.batch import masked_loss_sum
    from megatron.sft.training.loss import vocab_parallel_token_loss
    from megatron.sft.model.builder import build_model_from_checkpoint

    seq = spec["seq_length"]
    results = {}
    for pair in spec["pairs"]:
        meta = read_metadata(iteration_dir(pair["ckpt"]))
        _, shape = shape_of(meta.hf_config)
        vocab = shape.vocab_size
        tokens, labels, positions, cu, mask = packed_batch(spec["rows"], seq, vocab)
        per_backend = {}
        for backend in spec["backends"]:
            impl = LayerImpl("local", backend)
            chunks, _, _ = build_model_from_checkpoint(pair["ckpt"], impl=impl, seq_length=seq)
            attention = impl.attention_inputs(cu, len(spec["rows"]), seq, shape.sliding_window)
            collected = []

            def forward_step(data_iterator, model):
                next(data_iterator)
                output = model(tokens, positions, attention_mask=attention.attention_mask,
                               packed_seq_params=attention.packed_seq_params)

                def loss_func(out):
                    collected.append(gather_from_tensor_model_parallel_region(out)[..., :vocab]
                                     .detach().float())
                    loss_sum, count = masked_loss_sum(
                        vocab_parallel_token_loss(out, labels, vocab), mask)
                    return loss_sum, count, {}

                return output, loss_func

            for m in chunks:
                m.train()
                m.zero_grad()
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([0]), model=chunks[0],
                num_microbatches=1, seq_length=seq, micro_batch_size=len(spec["rows"]),
                forward_only=False)
            grads = {f"{c}.{n}": p.grad.detach().clone() for c, m in enumerate(chunks)
                     for n, p in m.named_parameters() if p.grad is not None}
            per_backend[backend] = (collected[0] if collected else None, grads)

        ref_grads = per_backend["dense"][1]
        grad_diff = max(((g - ref_grads[k]).abs().max().item() for b, (_, gs) in
                         per_backend.items() for k, g in gs.items()), default=0.0)
        grad_scale = max(g.abs().max().item() for g in ref_grads.values())
        stats = torch.tensor([grad_diff, grad_scale, float(len(ref_grads))], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        same_keys = all(set(gs) == set(ref_grads) for _, gs in per_backend.values())
        result = {"grad_max_abs_diff": stats[0].item(), "grad_abs_max": stats[1].item(),
                  "same_grad_keys": same_keys}
        if ps.is_pipeline_last_stage(ignore_virtual=True) and \
                ps.get_tensor_model_parallel_rank() == 0:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(pair["hf"], dtype=torch.float32,
                                                      attn_implementation="eager")
            ref = torch.zeros(len(spec["rows"]), seq, vocab)
            with torch.no_grad():
                for b, lengths in enumerate(spec["rows"]):
                    start = 0
                    for n in lengths:
                        ref[b, start:start + n] = hf(tokens[b:b + 1, start:start + n]).logits[0]
                        start += n
            real = mask.bool()
            result["logits_max_abs_diff"] = {
                b: (logits[real] - ref[real]).abs().max().item()
                for b, (logits, _) in per_backend.items()}
            result["logits_abs_max"] = ref[real].abs().max().item()
            Path(spec["out"]).with_suffix(f".{pair['name']}.json").write_text(json.dumps(result))
        results[pair["name"]] = result


if __name__ == "__main__":
    main()
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed(wait_for_peers=True)
