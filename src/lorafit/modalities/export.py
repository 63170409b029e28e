"""The way back (`lorafit export modalities`): what a lorafit run trained, as a checkpoint Modalities loads.

Both forms are `torch.save` state dicts named as Modalities' `model/huggingface_pretrained_model` names its model
(`huggingface_model.` + the Hugging Face model's names), so `model/checkpointed` with `checkpoint_loading/torch`
(a strict `load_state_dict`) takes them:

- `lora`: the LoRA model of the `lora` / `lora_2` branches, as their checkpoint saving writes it
  (`FSDPCheckpointSaving`: `wrapped_model.state_dict()` under FULL_STATE_DICT, which holds no FSDP names): every
  base weight, and for each adapted module the parameters of the branch's `LoRALinear` / `LoRAEmbedding`,
  `<module>.lora_A` (r, in) and `<module>.lora_B` (out, r): PEFT's shapes under other names. The branch's
  `model/lora` rebuilds those layers from `r`, `alpha` and `target_layers` (leaf names: every module of that name)
  and scales by alpha / r, so the run's LoRA must say the same: one r, an integer alpha, plain alpha / r scaling
  (no rsLoRA, no DoRA), Linear and Embedding layers, every module of an adapted leaf name adapted.
- `merged`: the plain model with W + (alpha / r) B A folded in (lorafit/lora/merging.py): what the seed config's
  `checkpointed_model` loads into `huggingface_pretrained_model` (modalities 0.5.0 and the `lora_2` branch; the
  `lora` branch's torch loading converts every model to LoRA r 2 before loading, so it wants the `lora` form).

The file is named as the `lora` branch names a model checkpoint (FSDPCheckpointSaving.CHECKPOINT_STRUCTURE),
`eid_<experiment_id>-model-num_steps_<steps>-num_tokens_<tokens>.bin`; Modalities reads a checkpoint from the path
its config gives, never by its name. Written atomically; an existing file is never replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorafit.atomic import atomic_file, own_folder
from lorafit.errors import UserError, writing
from lorafit.lora import get_settings, has_lora, lora_layers, merge_and_unload
from lorafit.modalities.checkpoint_keys import modalities_model_names
from lorafit.models.wrappers import canonical_name, unwrap

FORMS = ("lora", "merged")
# the entity a run's config trains: lorafit's `model`, a Modalities config's `wrapped_model`
RUN_MODEL_ENTITIES = ("model", "wrapped_model")
FILE_NAME = "eid_{experiment_id}-model-num_steps_{steps}-num_tokens_{tokens}.bin"
# the branches' LoRA layer for each lorafit base kind (utils.convert_layer); their Conv LoRA keeps other shapes
BRANCH_LAYERS = {"Linear": "LoRALinear", "Embedding": "LoRAEmbedding"}
# lorafit's (PEFT's) parameter names -> the branches' bare parameters
LORA_NAMES = {
    ".lora_A.weight": ".lora_A",
    ".lora_B.weight": ".lora_B",
    ".lora_embedding_A": ".lora_A",
    ".lora_embedding_B": ".lora_B",
}


@dataclass(frozen=True)
class BranchLora:
    """The `model/lora` block a Modalities config needs to load the `lora` form (the branches' LoraConfig)."""

    r: int
    alpha: int
    target_layers: list[str]

    def yaml(self, model_key: str = "huggingface_smol_llm_model") -> str:
        targets = "".join(f"\n      - {name}" for name in self.target_layers)
        return (
            f"lora_model:\n  component_key: model\n  variant_key: lora\n  config:\n    alpha: {self.alpha}\n"
            f"    r: {self.r}\n    target_layers:{targets}\n    model:\n      instance_key: {model_key}\n"
            "      pass_type: BY_REFERENCE"
        )


def checkpoint_name(experiment_id: str, steps: int, tokens: int) -> str:
    return FILE_NAME.format(experiment_id=experiment_id, steps=steps, tokens=tokens)


def _hf_model(model: nn.Module) -> nn.Module:
    from transformers import PreTrainedModel

    model = unwrap(model)
    if not isinstance(model, PreTrainedModel):  # Modalities' huggingface_pretrained_model wraps one of these
        raise UserError(
            f"the run's model is a {type(model).__name__}, not a Hugging Face model: Modalities loads it "
            "into model/huggingface_pretrained_model, which holds a Hugging Face model"
        )
    return model


def branch_lora(model: nn.Module) -> BranchLora:
    """The branches' r, alpha and target_layers for `model`'s LoRA, or one error listing what they cannot say."""
    settings = get_settings(model)
    layers = lora_layers(model)
    problems = []
    kinds = sorted({layer.base_kind for _, layer in layers} - set(BRANCH_LAYERS))
    if kinds:
        problems.append(f"LoRA on {', '.join(kinds)} layers (the branches' LoRA form holds Linear and Embedding)")
    if {layer.r for _, layer in layers} != {settings.r} or {layer.alpha for _, layer in layers} != {settings.alpha}:
        problems.append("ranks or alphas that differ between layers (the branches have one r and one alpha)")
    if settings.use_rslora:
        problems.append("rsLoRA scaling alpha / sqrt(r) (the branches scale by alpha / r)")
    if settings.use_dora or any(layer.lora_magnitude_vector is not None for _, layer in layers):
        problems.append("DoRA (the branches have no magnitude vector)")
    if float(settings.alpha) != int(settings.alpha):
        problems.append(f"alpha {settings.alpha} (the branches' alpha is an integer)")
    adapted = {name for name, _ in layers}
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    # the branches convert every leaf module of a target name (recursive_layer_conversion), adapted here or not
    skipped = [
        canonical_name(name)
        for name, module in unwrap(model).named_modules()
        if name.rsplit(".", 1)[-1] in leaves
        and name not in adapted
        and not list(module.children())
        and isinstance(module, (nn.Linear, nn.Embedding))
    ]
    if skipped:
        problems.append(
            f"target names the branches would convert everywhere, while the run left {len(skipped)} "
            f"such modules without LoRA (e.g. {skipped[0]})"
        )
    if problems:
        raise UserError(
            "the `lora` form cannot hold this run's LoRA: "
            + "; ".join(problems)
            + ". Export --form merged instead (the adapters folded into the weights)"
        )
    return BranchLora(r=settings.r, alpha=int(settings.alpha), target_layers=leaves)


def lora_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], BranchLora]:
    """The branches' LoRA model state dict (Modalities' names) and the model/lora settings that load it."""
    if not has_lora(model):
        raise UserError("the run trained no LoRA adapters (a full fine-tuning run): export --form merged")
    spec = branch_lora(model)
    hf = _hf_model(model)
    if any(layer.merged for _, layer in lora_layers(hf)):
        raise UserError("the model's adapters are merged into its weights: the `lora` form needs them apart")
    state = {}
    for key, value in hf.state_dict().items():
        for ours, theirs in LORA_NAMES.items():
            if key.endswith(ours):
                key = key[: -len(ours)] + theirs
                break
        state[key] = value.detach()
    return modalities_model_names(state), spec


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model, adapters folded in (in place), in Modalities' names."""
    plain = _hf_model(merge_and_unload(model) if has_lora(model) else model)
    return modalities_model_names({key: value.detach() for key, value in plain.state_dict().items()})


def write_checkpoint(state: dict[str, torch.Tensor], output_dir: Path, name: str) -> Path:
    """`output_dir/name`, written atomically; an existing file is refused, never replaced."""
    output_dir = own_folder(output_dir, "--output")
    target = output_dir / name
    if target.exists() or target.is_symlink():
        raise UserError(f"--output: {target} exists; lorafit never replaces a checkpoint: choose another folder")
    with writing(target, "--output"), atomic_file(target) as staging:
        torch.save(state, staging)
    return target


__all__ = [
    "FORMS",
    "RUN_MODEL_ENTITIES",
    "BranchLora",
    "branch_lora",
    "checkpoint_name",
    "lora_state_dict",
    "merged_state_dict",
    "write_checkpoint",
]
