"""`lorafit.save_pretrained(model, path)`: what `model.save_pretrained` should mean for a model with lorafit's LoRA.

transformers' `model.save_pretrained()` on a model that `lorafit.apply_lora` changed writes the base weights plus
`...lora_A.weight` / `...lora_B.weight` keys; `from_pretrained` of the base class drops those keys (its load
report lists them as UNEXPECTED) and returns the base model, without the fine-tuning. This function writes what
loads back: a PEFT adapter for a LoRA model, a Hugging Face folder for a plain one. lorafit does not replace the
model's own `save_pretrained` method: behaviour the reader cannot see is worse than a function the docs name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lorafit.atomic import atomic_folder
from lorafit.errors import UserError
from lorafit.lora.adapter import save_adapter
from lorafit.lora.model import has_lora


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """A model with LoRA -> `path` as a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`,
    loadable with `peft.PeftModel` / `AutoPeftModelForCausalLM` / `lorafit.load_adapter`); a model without ->
    `model.save_pretrained(path)`. The tokenizer, if given, is saved beside either."""

    path = Path(path)
    if has_lora(model):
        return save_adapter(
            model, path, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite, tokenizer=tokenizer
        )
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot save a model to {path}: it is a file")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
    with atomic_folder(path) as staging:  # as the adapter folder: replaced whole, or left as it was if this fails
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return path
