"""Training data: tokenize + pack (`pack_file`), read packed files (`PackedTokens`), datasets over them, the
collator (padding only: labels are shifted in the datasets) and the resumable distributed sampler.

Importing `lorafit.data.datasets` registers the `dataset/packed` and `dataset/instruction` components
(packed files); importing `lorafit.data.raw` registers `dataset/text` and `dataset/jsonl_instruction`
(a raw file + a tokenizer component, packed into a cache on first use), and `lorafit.data.hf_files`
`dataset/hf_datasets` (a local file or folder read with Hugging Face `datasets`). Record formats live in
`formats`, record sources in `records`, packing without cross-contamination in `packing`.
Names are imported lazily so that `lorafit data pack` does not pay for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PackedInfo": "data.pack",
    "PackedTokens": "data.pack",
    "load_tokenizer": "models.tokenizer",  # the one tokenizer loader, offered here beside pack_file
    "pack_file": "data.pack",
    "ResumableSampler": "data.sampler",
    "Collator": "data.datasets",
    "InstructionDataset": "data.datasets",
    "PackedDataset": "data.datasets",
    "PackedInstructionDataset": "data.datasets",
    "collate": "data.datasets",
    "IGNORE_INDEX": "data.datasets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorafit.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"lorafit.{_EXPORTS[name]}"), name)
