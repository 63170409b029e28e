"""Training data transforms: read records (`records`), their formats (`formats`, `chat`,
`chat_templates`), tokenize + pack into a packed token file and read it back (`token_files`: `pack_file`,
`PackedTokens`), documents into blocks without cross-contamination (`blocks`), Modalities' token files (`pbin`)
and the resumable distributed sampler (`sampler`).

The `dataset/*` components built from them live in `lorafit.datasets`; their classes and the collator are offered
here too (`PackedDataset`, `collate`, ...). Names are imported lazily so that `lorafit data pack` does not pay for
torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PackedInfo": "data.token_files",
    "PackedTokens": "data.token_files",
    "load_tokenizer": "models.tokenizer",  # the one tokenizer loader, offered here beside pack_file
    "pack_file": "data.token_files",
    "ResumableSampler": "data.sampler",
    "Collator": "datasets.packed",
    "InstructionDataset": "datasets.packed",
    "PackedDataset": "datasets.packed",
    "PackedInstructionDataset": "datasets.packed",
    "collate": "datasets.packed",
    "IGNORE_INDEX": "data.blocks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorafit.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"lorafit.{_EXPORTS[name]}"), name)
