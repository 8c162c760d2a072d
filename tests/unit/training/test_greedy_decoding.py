"""Greedy-decoding bookkeeping (training/greedy.py) and the --eval-generate reports and flags."""

import pytest

from megatron.sft.training.greedy import GreedyState, pad_rows


def test_pad_rows_right_and_left():
    rows, last = pad_rows([[1, 2, 3], [4]], multiple=4, pad_id=9)
    assert rows == [[1, 2, 3, 9], [4, 9, 9, 9]] and last == [2, 0]
    rows, last = pad_rows([[1, 2, 3], [4]], side="left")
    assert rows == [[1, 2, 3], [0, 0, 4]] and last == [2, 2]
    with pytest.raises(ValueError, match="at least one token"):
        pad_rows([[1], []])


def test_right_padding_keeps_each_rows_logits():
    """Why the generator right-pads: under causal attention the padding after a row changes
    nothing before it, so each row's last-token logits equal the row run alone (transformers,
    no attention mask)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron.sft.bridge.architectures import get_architecture

    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(**get_architecture("Qwen2ForCausalLM").tiny_config,
                                         attn_implementation="eager")).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    rows, last = pad_rows(prompts, multiple=4)
    with torch.no_grad():
        batch = model(torch.tensor(rows)).logits
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p])).logits[0, -1]
            assert torch.allclose(batch[i, last[i]], alone, atol=1e-5)


def test_greedy_state_stops_at_a_stop_token_or_the_limit():
    s = GreedyState([[1, 2], [3]], max_new_tokens=2, stop_ids=(0,))
    assert s.active() == [0, 1] and s.sequences([0, 1]) == [[1, 2], [3]]
    s.step([0, 1], [0, 7])  # row 0 emits the stop token: kept, row done
    assert s.active() == [1] and s.generated == [[0], [7]] and s.stopped == [True, False]
    s.step([1], [8])
    assert s.finished and s.generated[1] == [7, 8] and not s.stopped[1]
    with pytest.raises(ValueError, match="already finished"):
        s.step([1], [9])
    with pytest.raises(ValueError, match="2 next tokens for 1 rows"):
        GreedyState([[1]], 3).step([0], [1, 2])
    with pytest.raises(ValueError, match="at least one"):
        GreedyState([[1]], 0)


def test_reports():
    from megatron.sft.training.eval_generation import console_lines, text_summary

    g = {"source": "valid sample 0 (document 3)", "prompt": "x" * 200 + "<|im_start|>assistant\n",
         "completion": "7.<|im_end|>", "reference": "7.<|im_end|>", "new_tokens": 3,
         "stopped": True}
    lines = console_lines([g], 20)
    assert lines[0].startswith("generate @ 20 [valid sample 0 (document 3)] ...'")
    assert lines[0].endswith("<|im_start|>assistant\\n'")  # the prompt's end, newline visible
    assert lines[1] == ("  -> '7.<|im_end|>' (3 tokens, end of turn; reference "
                        "'7.<|im_end|>')")
    md = text_summary([g, {**g, "stopped": False, "reference": None}])
    assert md.count("**valid sample 0 (document 3)**") == 2 and "token limit" in md
    assert "    7.<|im_end|>" in md and md.count("reference:") == 1


@pytest.mark.parametrize("flags, message", [
    (dict(eval_generate=2), "without --eval-interval there is none"),
    (dict(eval_generate=-1, eval_interval=5), "--eval-generate -1 is negative"),
    (dict(eval_generate=2, eval_interval=5, eval_generate_tokens=0),
     "--eval-generate-tokens 0"),
    (dict(eval_prompts="p.jsonl", eval_interval=5), "--eval-prompts p.jsonl needs "
                                                    "--eval-generate N"),
])
def test_eval_generate_flag_errors(flags, message):
    from megatron.sft.training.arguments import TrainConfig

    cfg = TrainConfig(load="x", data_path="d", train_iters=10, **flags)
    with pytest.raises(ValueError, match=message):
        cfg.validate(1)


def test_validation_prompts_need_a_validation_split():
    from megatron.sft.training.eval_generation import validation_prompts

    with pytest.raises(ValueError, match="--eval-prompts FILE"):
        validation_prompts(None, 2)


def test_generations_reach_tensorboard_as_text(tmp_path):
    """The record's ``generations`` become one text summary per step, read back with
    TensorBoard's own event reader; the scalars beside them stay scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron.sft.training.eval_generation import text_summary
    from megatron.sft.training.metrics import MetricSinks

    g = [{"source": "valid sample 0 (document 1)", "prompt": "<|im_start|>user\nHi",
          "completion": "Hello<|im_end|>", "reference": None, "new_tokens": 2, "stopped": True}]
    sinks = MetricSinks(str(tmp_path), None, {})
    sinks.log({"iteration": 5, "loss": 1.5, "generations": g, "generate_s": 0.25})
    sinks.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0}).Reload()
    [text] = events.Tensors("eval/generations/text_summary")
    assert text.step == 5
    assert text.tensor_proto.string_val[0].decode() == text_summary(g)
    assert events.Scalars("train/generate_s")[0].value == 0.25
