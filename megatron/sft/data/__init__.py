"""SFT data: record formats, chat-template rendering with loss masks, indexed IO, packing.

Modules (pure ones import neither torch.distributed nor megatron-core):

- ``formats``         record (messages / sharegpt / alpaca / custom) -> ``Conversation``   [pure]
- ``prompt_styles``   named styles (alpaca, chatml) -> text + assistant character spans    [pure]
- ``chat_template``   the tokenizer's own template + locating each message in its output   [pure]
- ``render``          text -> token ids + loss mask via the tokenizer's offset mapping       [pure]
- ``readers``         streaming .jsonl/.json/.parquet/folder/HF save_to_disk reader          [IO]
- ``indexed_writer``  atomic megatron-core ``IndexedDatasetBuilder`` pair writer             [IO]
- ``preprocess``      the N-worker, order-preserving pre-tokenisation pipeline               [IO]
- ``stats``           counters written to ``<prefix>_stats.json``
- ``packing``         best-fit-decreasing packing, label shift, position ids, cu_seqlens    [pure numpy]
- ``sft_dataset``     the training-side torch ``Dataset`` (packed or padded rows)
- ``tiny_tokenizer``  a small in-process BPE tokenizer with ChatML/Llama-3/DeepSeek-R1 templates

Nothing is imported here so that ``import megatron.sft.data.formats`` stays cheap.
"""
