"""The `dataset/*` components: the builders a config names (torchtune's `datasets/`). What they use to read,
tokenize and pack records lives in `lorafit.data` (the transforms).

- `packed`: `dataset/packed` and `dataset/instruction`, over a file written by `lorafit data pack`; the collator.
- `text_files`: `dataset/text` and `dataset/jsonl_instruction`, a raw file tokenized into a cache on first use.
- `hf_datasets`: `dataset/hf_datasets`, a local file or folder read with Hugging Face `datasets`, same cache.

Importing a module registers its components (lorafit/components.py lists them).
"""
