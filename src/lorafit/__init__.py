"""lorafit: LoRA fine-tuning of Hugging Face causal language models, driven by YAML configs."""

from lorafit.config.registry import ComponentConfig, register_component

__version__ = "0.1.0"

__all__ = ["ComponentConfig", "__version__", "register_component"]
