"""The built-in components. Importing a component module registers it; this is the one list of them."""

from __future__ import annotations

import importlib

BUILTIN_COMPONENT_MODULES = [
    "lorafit.models.huggingface",
    "lorafit.models.checkpointed",
    "lorafit.models.tokenizer",
    "lorafit.lora.component",
    "lorafit.data.datasets",
    "lorafit.data.raw",
    "lorafit.training.optim",
    "lorafit.distributed.parallel",
    "lorafit.evaluation.exact_match",
    "lorafit.modalities.tokenizer",
]


def load_builtin_components() -> None:
    for module in BUILTIN_COMPONENT_MODULES:
        importlib.import_module(module)
