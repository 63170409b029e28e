"""Names in Modalities checkpoints -> lorafit's parameter names, said in the log, or an error saying what is missing.

A Modalities `model.bin` is `model.state_dict()` of Modalities' wrapper modules:
- `model/huggingface_pretrained_model` keeps the Hugging Face model as `self.huggingface_model`, so every key
  starts with `huggingface_model.`; FSDP1 and activation checkpointing insert `_fsdp_wrapped_module.` and
  `_checkpoint_wrapped_module.` inside the path; DDP adds `module.`, torch.compile `_orig_mod.`.
- Modalities' LoRA layers (`LoRALinear`, `LoRAEmbedding`) hold A and B as bare parameters, `...q_proj.lora_A`
  (r, in) and `...q_proj.lora_B` (out, r): PEFT's and lorafit's shapes, named `...q_proj.lora_A.weight`; for
  embeddings lorafit keeps PEFT's `lora_embedding_A` / `lora_embedding_B`. (Modalities' embedding A is
  (r, num_embeddings) and B (dim, r); PEFT's embedding A is (r, num_embeddings) and B (dim, r) too.)

`map_modalities_keys` applies a mapping only when it is needed (a key the model lacks) and every renamed key
then exists in the model; `describe_unmapped` explains what no mapping covers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lorafit.models.checkpointed import register_key_mapping

# Modalities' HuggingFacePretrainedModel keeps the Hugging Face model as `self.huggingface_model`
HF_WRAPPER_PREFIX = "huggingface_model."
WRAPPER_PREFIXES = (HF_WRAPPER_PREFIX, "module.", "_orig_mod.")
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
LORA_SUFFIXES = {
    ".lora_A": (".lora_A.weight", ".lora_embedding_A"),
    ".lora_B": (".lora_B.weight", ".lora_embedding_B"),
}


def modalities_model_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face model's state dict named as Modalities' `model/huggingface_pretrained_model` names it (what its
    strict torch checkpoint loading wants); `map_modalities_keys` takes the prefix off again."""
    return {HF_WRAPPER_PREFIX + key: value for key, value in state_dict.items()}


def map_modalities_keys(
    state_dict: dict[str, torch.Tensor], model_keys: Iterable[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`state_dict` with Modalities' names turned into the model's, and one line per mapping applied."""
    expected = set(model_keys)
    if set(state_dict) <= expected:
        return state_dict, []
    notes: list[str] = []
    renamed: dict[str, str] = {}
    counts = {"prefix": {}, "infix": {}, "lora": 0}
    for key in state_dict:
        new = key
        if new not in expected:
            for infix in WRAPPER_INFIXES:
                if infix in new:
                    new = new.replace(infix, "")
                    counts["infix"][infix] = counts["infix"].get(infix, 0) + 1
            for prefix in WRAPPER_PREFIXES:
                while new.startswith(prefix) and new not in expected:
                    new = new[len(prefix) :]
                    counts["prefix"][prefix] = counts["prefix"].get(prefix, 0) + 1
            for suffix, candidates in LORA_SUFFIXES.items():
                if new.endswith(suffix) and new not in expected:
                    stem = new[: -len(suffix)]
                    match = next((stem + c for c in candidates if stem + c in expected), None)
                    if match:
                        new = match
                        counts["lora"] += 1
        renamed[key] = new
    if len(set(renamed.values())) != len(renamed):
        return state_dict, []  # two file keys would land on one parameter: leave it to the key check to report
    for prefix, n in counts["prefix"].items():
        notes.append(f"removed the wrapper prefix '{prefix}' from {n} names")
    for infix, n in counts["infix"].items():
        notes.append(f"removed the wrapper part '{infix}' from {n} names")
    if counts["lora"]:
        notes.append(
            f"renamed {counts['lora']} Modalities LoRA parameters (X.lora_A / X.lora_B -> X.lora_A.weight "
            "/ X.lora_B.weight, PEFT's names; embeddings: lora_embedding_A / _B)"
        )
    if not notes:
        return state_dict, []
    return {renamed[k]: v for k, v in state_dict.items()}, notes


def describe_unmapped(unexpected: list[str], model_keys: Iterable[str]) -> str:
    """A sentence on why file keys found no place in the model, when a Modalities mapping explains it."""
    expected = set(model_keys)
    lora = [k for k in unexpected if k.endswith((".lora_A", ".lora_B", ".lora_A.weight", ".lora_B.weight"))]
    if lora and not any(".lora_" in k for k in expected):
        return (
            f". The file holds LoRA adapters ({len(lora)} tensors, e.g. {lora[0]}) but this model has no LoRA "
            "layers: wrap a model/lora (with the same target_layers and r) in model/checkpointed, instead of "
            "loading the checkpoint into the base model"
        )
    if lora:
        stems = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
        return (
            f". No LoRA layer of this model matches the file's adapters on {len(stems)} modules (e.g. "
            f"{stems[0]}): target_layers or the model differ from the run that wrote it"
        )
    return ""


class ModalitiesKeys:
    """The mapping above, as model/checkpointed takes one (models/checkpointed.py `KeyMapping`)."""

    map = staticmethod(map_modalities_keys)
    describe_unmapped = staticmethod(describe_unmapped)


register_key_mapping(ModalitiesKeys())
