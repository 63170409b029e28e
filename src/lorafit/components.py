"""Every built-in component, in one table: (component_key, variant_key) -> the module that defines and registers it.

A component's config model and builder sit together in its module and register there
(`@register_component`); this table is the one list of them. `load_builtin_components()` imports the modules,
and a test checks that what they register is exactly this table, so a component added to a module without a
line here (or a line without its component) is caught.
"""

from __future__ import annotations

import importlib

BUILTIN_COMPONENTS: dict[tuple[str, str], str] = {
    ("model", "huggingface_pretrained_model"): "lorafit.models.huggingface",
    ("model", "huggingface_from_config"): "lorafit.models.huggingface",
    ("model", "checkpointed"): "lorafit.models.checkpointed",
    ("checkpoint_loading", "torch"): "lorafit.models.checkpointed",
    ("model", "lora"): "lorafit.lora.component",
    ("tokenizer", "huggingface"): "lorafit.models.tokenizer",
    ("tokenizer", "pretrained_hf_tokenizer"): "lorafit.modalities.tokenizer",
    ("dataset", "text"): "lorafit.data.raw",
    ("dataset", "jsonl_instruction"): "lorafit.data.raw",
    ("dataset", "hf_datasets"): "lorafit.data.hf_files",
    ("dataset", "packed"): "lorafit.data.datasets",
    ("dataset", "instruction"): "lorafit.data.datasets",
    ("optimizer", "adamw"): "lorafit.training.optim",
    ("scheduler", "constant"): "lorafit.training.optim",
    ("scheduler", "cosine"): "lorafit.training.optim",
    ("scheduler", "onecycle"): "lorafit.training.optim",
    ("parallelism", "none"): "lorafit.distributed.parallel",
    ("parallelism", "ddp"): "lorafit.distributed.parallel",
    ("parallelism", "fsdp2"): "lorafit.distributed.parallel",
    ("evaluator", "exact_match"): "lorafit.evaluation.exact_match",
}
BUILTIN_COMPONENT_MODULES = sorted(set(BUILTIN_COMPONENTS.values()))


def load_builtin_components() -> None:
    for module in BUILTIN_COMPONENT_MODULES:
        importlib.import_module(module)
