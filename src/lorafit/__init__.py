"""lorafit: LoRA fine-tuning of Hugging Face causal language models, driven by YAML configs.

The LoRA API is imported lazily, so `lorafit --help` and config checks do not pay for importing torch.
"""

from lorafit.config.registry import ComponentConfig, register_component

__version__ = "0.1.0"

_LORA_API = (
    "apply_lora",
    "merge_and_unload",
    "save_adapter",
    "load_adapter",
    "merge_lora",
    "unmerge_lora",
    "save_pretrained",
)


def __getattr__(name: str):
    if name == "train":  # lorafit.train(config, overrides=...): `lorafit run` from Python (lorafit/api.py)
        from lorafit.api import train

        return train
    if name in _LORA_API:
        import lorafit.lora

        return getattr(lorafit.lora, name)
    raise AttributeError(f"module 'lorafit' has no attribute '{name}'")


__all__ = ["ComponentConfig", "__version__", "register_component", "train", *_LORA_API]
