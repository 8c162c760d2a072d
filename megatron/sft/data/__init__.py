"""SFT data: record formats, chat-template rendering with loss masks, indexed IO, packing.

Modules (pure ones import neither torch.distributed nor megatron-core):

- ``formats``           record (messages / sharegpt / alpaca / custom) -> ``Conversation``;
                        the ``RECORD_FORMATS`` table is where a new format is added            [pure]
- ``prompt_styles``     named styles (alpaca, chatml) -> text + assistant character spans      [pure]
- ``chat_template``     the tokenizer's own template (with tools) + locating each turn in it   [pure]
- ``template_compile``  a chat template compiled as ``apply_chat_template`` does, without
                        importing transformers                                                 [pure]
- ``json_tokenizer``    a tokenizer folder read with ``tokenizers`` alone where that is exact  [IO]
- ``loss_mask``         character spans + token offsets -> learned token ranges and masks      [pure]
- ``render``            records -> token ids + loss mask, per-turn loss, drops and notices     [pure]
- ``readers``           streaming .jsonl/.json (plain or .gz/.bz2/.xz/.zst)/.parquet/folder/
                        HF save_to_disk reader                                                 [IO]
- ``render_flags``      the reading/rendering/record-format CLI flags, defined once for the
                        pre-tokenizer and the preview                                          [pure]
- ``indexed_writer``    atomic writer of a megatron-core ``IndexedDataset`` pair (format written
                        here: no megatron-core import)                                         [IO]
- ``indexed_reader``    numpy-only reader of a (tokens, loss mask) pair: no torch, for previews [IO]
- ``preprocess``        the N-worker, order-preserving pre-tokenisation pipeline               [IO]
- ``stats``             counters written to ``<prefix>_stats.json``
- ``packing``           best-fit-decreasing packing, label shift, position ids, cu_seqlens    [pure numpy]
- ``sft_dataset``       the training-side torch ``Dataset`` (packed or padded rows)
- ``validation``        checks at open: .bin size vs .idx, token ids vs the model's vocabulary,
                        samples longer than the model's positions                          [IO]
- ``eval_prompts``      prompts for --eval-generate: samples / records cut before their first
                        assistant turn, the template's end-of-turn tokens                      [pure]
- ``inspect``           what is learned, shown: mask runs -> highlighted text ([[…]] or ANSI),
                        per-sample counts, length / learned-share histogram data               [pure]
- ``inspect_io``        the preview's sources (a tokenized prefix; a raw file through the
                        pre-tokenizer's renderer), token-by-token decoding, the --plot PNG     [IO]
- ``tiny_tokenizer``    a small in-process BPE tokenizer with ChatML/Llama-3/DeepSeek-R1 and
                        two tool-calling (Qwen-style ChatML, Llama-3.1) templates, for tests
- ``tokenizer_edit``    renaming added/special tokens and swapping the chat template           [pure]
- ``tokenizer_edit_io`` reading, verifying and atomically writing an edited tokenizer folder   [IO]
- ``tokenizer_fingerprint`` a content hash of a tokenizer (vocabulary, merges, added tokens),
                        recorded in ``_stats.json`` and compared by training                  [IO]

Nothing is imported here so that ``import megatron.sft.data.formats`` stays cheap.
"""
