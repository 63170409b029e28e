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
    ("dataset", "packed_mem_map_dataset_continuous"): "lorafit.modalities.data",
    ("collate_fn", "gpt_2_llm_collator"): "lorafit.modalities.data",
    ("collate_fn", "mask_loss_collator_wrapper"): "lorafit.modalities.data",
    ("sampler", "distributed_sampler"): "lorafit.modalities.data",
    ("sampler", "resumable_distributed_sampler"): "lorafit.modalities.data",
    ("batch_sampler", "default"): "lorafit.modalities.data",
    ("data_loader", "default"): "lorafit.modalities.data",
    ("model", "fsdp_wrapped"): "lorafit.modalities.training",
    ("model", "fsdp2_wrapped"): "lorafit.modalities.training",
    ("model", "model_initialized"): "lorafit.modalities.initialization",
    ("model_initialization", "composed"): "lorafit.modalities.initialization",
    ("app_state", "raw"): "lorafit.modalities.entities",
    ("device_mesh", "default"): "lorafit.modalities.entities",
    ("optimizer", "adam_w"): "lorafit.modalities.training",
    ("optimizer", "adam"): "lorafit.modalities.training",
    ("scheduler", "onecycle_lr"): "lorafit.modalities.training",
    ("scheduler", "step_lr"): "lorafit.modalities.training",
    ("scheduler", "constant_lr"): "lorafit.modalities.training",
    ("scheduler", "cosine_annealing_lr"): "lorafit.modalities.training",
    ("scheduler", "dummy_lr"): "lorafit.modalities.training",
    ("loss", "clm_cross_entropy_loss"): "lorafit.modalities.training",
    ("gradient_clipper", "fsdp"): "lorafit.modalities.training",
    ("gradient_clipper", "fsdp_logging_only"): "lorafit.modalities.training",
    ("gradient_clipper", "fsdp2"): "lorafit.modalities.training",
    ("gradient_clipper", "fsdp2_logging_only"): "lorafit.modalities.training",
    ("gradient_clipper", "dummy"): "lorafit.modalities.training",
    ("checkpoint_saving_strategy", "save_k_most_recent_checkpoints_strategy"): "lorafit.modalities.checkpointing",
    ("checkpoint_saving_strategy", "save_every_k_steps_checkpointing_strategy"): "lorafit.modalities.checkpointing",
    ("checkpoint_saving_execution", "fsdp"): "lorafit.modalities.checkpointing",
    ("checkpoint_saving", "default"): "lorafit.modalities.checkpointing",
    ("number_conversion", "local_num_batches_from_num_samples"): "lorafit.modalities.numbers",
    ("number_conversion", "local_num_batches_from_num_tokens"): "lorafit.modalities.numbers",
    ("number_conversion", "num_steps_from_num_samples"): "lorafit.modalities.numbers",
    ("number_conversion", "num_steps_from_num_tokens"): "lorafit.modalities.numbers",
    ("number_conversion", "num_tokens_from_num_steps_callable"): "lorafit.modalities.numbers",
    ("number_conversion", "num_tokens_from_num_steps"): "lorafit.modalities.numbers",
    ("number_conversion", "num_samples_from_num_tokens"): "lorafit.modalities.numbers",
    ("number_conversion", "num_tokens_from_packed_mem_map_dataset_continuous"): "lorafit.modalities.numbers",
    ("progress_subscriber", "rich"): "lorafit.modalities.subscribers",
    ("progress_subscriber", "dummy"): "lorafit.modalities.subscribers",
    ("results_subscriber", "wandb"): "lorafit.modalities.subscribers",
    ("results_subscriber", "rich"): "lorafit.modalities.subscribers",
    ("results_subscriber", "dummy"): "lorafit.modalities.subscribers",
    ("dataset", "text"): "lorafit.datasets.text_files",
    ("dataset", "jsonl_instruction"): "lorafit.datasets.text_files",
    ("dataset", "hf_datasets"): "lorafit.datasets.hf_datasets",
    ("dataset", "packed"): "lorafit.datasets.packed",
    ("dataset", "instruction"): "lorafit.datasets.packed",
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
# other config layouts and the checkpoint names they save under, each translated at the border into lorafit's:
# config/layouts.py (register_layout) and models/checkpointed.py (register_key_mapping)
BUILTIN_TRANSLATOR_MODULES = ("lorafit.modalities.layout", "lorafit.modalities.checkpoint_keys")


def load_builtin_components() -> None:
    for module in (*BUILTIN_COMPONENT_MODULES, *BUILTIN_TRANSLATOR_MODULES):
        importlib.import_module(module)


def load_builtin_translators() -> None:
    """Only the translators (e.g. for a checkpoint loaded outside a config: the key mappings must be there)."""
    for module in BUILTIN_TRANSLATOR_MODULES:
        importlib.import_module(module)
