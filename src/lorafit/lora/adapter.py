"""Adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's, adapter name stripped: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, embeddings
`base_model.model.<module>.lora_embedding_A` / `_B`. `target_modules` is written so that PEFT's own matching
selects exactly the adapted modules (leaf names when they are exact, longer suffixes or a full-match regex
otherwise), and rsLoRA is written as `use_rslora`: the file means the same to every loader.

DoRA adds `<module>.lora_magnitude_vector` (PEFT's key) and `use_dora: true`. A PiSSA/OLoRA model trains on a
residual base; its adapter is written converted, as PEFT's `path_initial_model_for_weight_conversion` does: rank
2r ([A; A0], [B, -B0]), alpha doubled (rsLoRA: x sqrt 2), `init_lora_weights: true`, so that it applies to the
original base like any LoRA adapter.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafit.atomic import atomic_folder
from lorafit.errors import Problem, UserError
from lorafit.lora.hyper import hyper_problems
from lorafit.lora.layers import copy_full_tensor
from lorafit.lora.matching import ALL_LINEAR, Target, candidates, resolve_targets
from lorafit.lora.model import (
    LoraSettings,
    get_settings,
    has_lora,
    inject,
    lora_layers,
    named_lora_parameters,
    remove_lora,
)
from lorafit.lora.variants import DECOMPOSING_INITS, converted_alpha, converted_factors
from lorafit.models.wrappers import canonical_name, full_tensor, unwrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return full_tensor(tensor).detach().to("cpu").contiguous().clone()


def adapter_state_dict(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names, on CPU.

    `source` is the model, or a full (gathered) state dict with our module names, e.g. from
    `get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))`; only LoRA keys are
    taken from it (a gathered dict can hold frozen base keys such as a tied `lm_head.weight`).
    """
    if isinstance(source, nn.Module):
        items = list(named_lora_parameters(source))
    else:
        items = [(canonical_name(k), v) for k, v in source.items() if k.endswith(LORA_SUFFIXES)]
    return {PREFIX + name: _full(value) for name, value in sorted(items)}


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {PREFIX + name: tuple(p.shape) for name, p in named_lora_parameters(model)}


def peft_target_modules(model: nn.Module, modules: list[str]) -> list[str] | str:
    """A `target_modules` that PEFT resolves to exactly `modules` on this model."""
    wanted = set(modules)
    names = {canonical_name(c.name) for c in candidates(unwrap(model))}
    for depth in (1, 2, 3):
        suffixes = sorted({".".join(n.split(".")[-depth:]) for n in wanted})
        hit = {n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)}
        if hit == wanted:
            return suffixes
    # a string is matched by PEFT with re.fullmatch against each qualified name
    return "|".join(re.escape(n) for n in sorted(wanted))


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    settings = get_settings(model)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(unwrap(model), "config", None), "_name_or_path", None) or None
        if base_model_name_or_path and Path(base_model_name_or_path).is_dir():
            # a local folder as an absolute path: PEFT's AutoPeftModel resolves it from any working directory
            base_model_name_or_path = str(Path(base_model_name_or_path).resolve())
    r, alpha = settings.r, settings.alpha
    if settings.init in DECOMPOSING_INITS:  # written converted (module docstring)
        r, alpha = 2 * r, converted_alpha(alpha, settings.use_rslora)
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    init = True if settings.init in ("kaiming", *DECOMPOSING_INITS) else settings.init
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": settings.use_rslora,
        "target_modules": peft_target_modules(model, list(settings.modules)),
        "lora_dropout": settings.dropout,
        "fan_in_fan_out": settings.fan_in_fan_out,
        "bias": "none",
        "use_dora": settings.use_dora,
        "init_lora_weights": init,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Write the adapter folder atomically (temp folder + rename), with `tokenizer` saved in it if given. Tensors
    come from `state_dict` if given.

    Under FSDP2 pass the gathered full state dict and call this on rank 0 only. An existing non-empty
    folder is replaced only with `overwrite=True`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot write an adapter to {path}: it is a file")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"adapter folder {path} exists and is not empty (pass overwrite=True to replace it)")
    config = adapter_config(model, base_model_name_or_path)
    tensors = adapter_state_dict(model if state_dict is None else state_dict)
    _check_complete(tensors, expected_shapes(model), "the state dict to save")
    tensors = _converted_to_original_base(model, tensors)
    with atomic_folder(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def _converted_to_original_base(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PiSSA/OLoRA: each layer's trained A, B with its initial A0, B0 as a plain adapter on the original base."""
    if get_settings(model).init not in DECOMPOSING_INITS:
        return tensors
    out = dict(tensors)
    for name, layer in lora_layers(model):
        if not layer.decomposed:
            raise ValueError(
                f"{canonical_name(name)} was never decomposed ({layer.init}): reset_lora_parameters "
                "must run once the base weights are loaded"
            )
        key = PREFIX + canonical_name(name)
        a, b = converted_factors(
            tensors[f"{key}.lora_A.weight"],
            tensors[f"{key}.lora_B.weight"],
            _full(layer.lora_init_A),
            _full(layer.lora_init_B),
        )
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a.contiguous(), b.contiguous()
    return out


def _check_complete(tensors: Mapping[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} instead of {shapes[k]}"
        for k in sorted(set(shapes) & set(tensors))
        if tuple(tensors[k].shape) != shapes[k]
    ]
    if missing or extra or wrong:
        raise ValueError(f"{what} does not match the model's adapters: " + _listing(missing, extra, wrong))


def _listing(missing: list[str], extra: list[str], wrong: list[str]) -> str:
    def cut(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    parts = [
        f"missing keys: {cut(missing)}" if missing else "",
        f"unexpected keys: {cut(extra)}" if extra else "",
        f"wrong shapes: {cut(wrong)}" if wrong else "",
    ]
    return "; ".join(p for p in parts if p)


# adapter_config.json fields whose non-default values change what the adapter computes; we refuse them
_UNSUPPORTED = {
    "layers_to_transform": lambda v: v is None or v == [],
    "rank_pattern": lambda v: not v,
    "alpha_pattern": lambda v: not v,
    "modules_to_save": lambda v: not v,
    "bias": lambda v: v in (None, "none"),
    "lora_bias": lambda v: not v,
    "target_parameters": lambda v: not v,
    "exclude_modules": lambda v: not v,
    "trainable_token_indices": lambda v: not v,
    "use_qalora": lambda v: not v,
    "alora_invocation_tokens": lambda v: not v,
}


_MODULE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def check_weights_header(weights: Path, r: int) -> None:
    """Read only the safetensors header (no tensor is loaded) and check that every adapter tensor is a float
    tensor of rank `r`: an untrusted `r` (say 10**9) must not drive an allocation the file does not back."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as file:
            headers = {key: file.get_slice(key) for key in file.keys()}  # noqa: SIM118 - safe_open has no __iter__
            shapes = {key: tuple(s.get_shape()) for key, s in headers.items()}
            dtypes = {key: s.get_dtype() for key, s in headers.items()}
    except Exception as error:  # SafetensorError, OSError: a truncated or damaged file is the user's to replace
        reason = f"not a valid safetensors file (truncated or corrupt?): {error}"
        raise UserError(f"cannot read {weights}: {reason}") from None
    if not any(key.endswith(LORA_SUFFIXES) for key in shapes):
        raise UserError(f"{weights} holds no LoRA tensor (no key ends with {', '.join(LORA_SUFFIXES)})")
    rank_dim = {"lora_A.weight": 0, "lora_embedding_A": 0, "lora_B.weight": 1, "lora_embedding_B": 1}
    problems, ranks = [], set()
    for key, shape in sorted(shapes.items()):
        if not dtypes[key].startswith(("F", "BF")):
            problems.append(f"{key} is {dtypes[key]}, not a floating-point tensor")
        dim = next((d for suffix, d in rank_dim.items() if key.endswith(suffix)), None)
        # a conv adapter's A and B are convolution weights: (r, in, *kernel) and (out, r, 1, ...), 1 to 3 kernel dims
        conv = key.endswith(".weight") and 3 <= len(shape) <= 5
        if dim is not None and len(shape) != 2 and not conv:
            problems.append(f"{key} has shape {shape}, not a matrix (or a 1d/2d/3d convolution weight)")
        elif dim is not None:
            ranks.add(shape[dim])
    if ranks and r not in ranks:  # single mis-shaped tensors are named later, key by key
        problems.append(f"no LoRA tensor has rank r = {r} (adapter_config.json); the file's ranks: {sorted(ranks)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{weights}: " + "; ".join(problems[:3]) + more)


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json, checked for what lorafit can load (every problem listed at once)."""
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise UserError(f"adapter folder not found: {path}")
    if not file.is_file():
        raise UserError(f"{file} not found: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise UserError(f"{file} must hold a JSON object")
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(Problem("peft_type", f"only LORA adapters are supported, got {config.get('peft_type')!r}"))
    problems += hyper_problems(
        config.get("r"),
        config.get("lora_alpha"),
        config.get("lora_dropout") or 0.0,
        alpha_key="lora_alpha",
        dropout_key="lora_dropout",
    )
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (isinstance(targets, list) and targets):
        problems.append(Problem("target_modules", f"must be a non-empty list or a regex string, got {targets!r}"))
    elif isinstance(targets, list):
        bad = [t for t in targets if not (isinstance(t, str) and _MODULE_NAME.fullmatch(t))]
        if bad:
            problems.append(
                Problem(
                    "target_modules",
                    f"items must be module names (letters, digits, '_', '.', '-'), got {', '.join(map(repr, bad[:5]))}",
                )
            )
    if str(config.get("init_lora_weights")).lower().startswith(DECOMPOSING_INITS):
        problems.append(
            Problem(
                "init_lora_weights",
                f"{config['init_lora_weights']!r}: this adapter was saved "
                "unconverted and only applies to the residual base it was trained on; save it "
                "with PEFT's path_initial_model_for_weight_conversion (or from lorafit, which "
                "converts) to use it on the original model",
            )
        )
    for key, is_default in _UNSUPPORTED.items():
        if key in config and not is_default(config[key]):
            problems.append(Problem(key, f"{config[key]!r} is not supported by lorafit"))
    if problems:
        raise UserError("", problems=[Problem(f"{file}: {p.path}", p.message) for p in problems])
    return config


def _peft_targets(targets: list[str] | str) -> list[Target]:
    """PEFT's `target_modules` semantics: a string is a full-match regex (or all-linear), list items are names."""
    if isinstance(targets, str):
        return [
            Target("all-linear", ALL_LINEAR, targets)
            if targets.lower() == ALL_LINEAR
            else Target("regex", targets, "re:" + targets)
        ]
    return [Target("name", t, t) for t in targets]


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by lorafit or by `peft` into `model` (injecting LoRA first if it has none).

    Tensors load strictly: missing, unexpected or mis-shaped keys are a UserError naming the file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config = read_adapter_config(path)
    targets = _peft_targets(config["target_modules"])
    settings = LoraSettings(
        r=config["r"],
        alpha=float(config["lora_alpha"]),
        target_layers=[t.text for t in targets],
        modules={},
        dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        init="gaussian" if str(config.get("init_lora_weights")).lower() == "gaussian" else "kaiming",
        use_dora=bool(config.get("use_dora", False)),
    )
    where = f"{path / CONFIG_NAME}: target_modules"
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        other = " (only safetensors adapters are supported)" if (path / "adapter_model.bin").exists() else ""
        raise UserError(f"{weights} not found{other}")
    check_weights_header(weights, config["r"])  # before anything is allocated from the config's numbers
    try:
        tensors = load_file(str(weights))
    except Exception as error:  # SafetensorError, OSError: a truncated or damaged file is the user's to replace
        reason = f"not a valid safetensors file (truncated or corrupt?): {error}"
        raise UserError(f"cannot read {weights}: {reason}") from None
    fresh = not has_lora(model)
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    if fresh:
        inject(model, settings, targets, field_name=where, each_must_match=False, seed=None)
    else:
        _check_same_adapter(model, settings, targets, where)
    # PEFT also saves the whole embedding table (`save_embedding_layers`) when embeddings are targeted, and
    # loading it replaces the base table (e.g. a resized vocabulary): do the same, so the file means what it
    # meant there
    base_weights = _base_layer_weights(model, tensors)
    expected = expected_shapes(model) | {key: tuple(w.shape) for key, w in base_weights.items()}
    try:
        _check_complete(tensors, expected, str(weights))
    except ValueError as error:
        if fresh:  # leave the model as it came
            remove_lora(model)
            for param in model.parameters():
                param.requires_grad_(trainable[id(param)])
        raise UserError(str(error)) from None
    params = dict(named_lora_parameters(model))
    for key, value in tensors.items():
        target = base_weights[key] if key in base_weights else params[key[len(PREFIX) :]]
        copy_full_tensor(target, value)
    return model


def _base_layer_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<lora module>.base_layer.weight` keys in a PEFT file -> that module's base weight."""
    layers = {PREFIX + canonical_name(name) + ".base_layer.weight": layer.weight for name, layer in lora_layers(model)}
    return {key: layers[key] for key in tensors if key in layers}


def _check_same_adapter(model: nn.Module, settings: LoraSettings, targets: list[Target], where: str) -> None:
    current = get_settings(model)
    if any(layer.merged for _, layer in lora_layers(model)):
        raise UserError("cannot load an adapter into a merged model: unmerge it first")
    resolved = {canonical_name(n) for n in resolve_targets(unwrap(model), targets, field=where, each_must_match=False)}
    differences = [
        f"{what}: model has {ours!r}, adapter has {theirs!r}"
        for what, ours, theirs in [
            ("r", current.r, settings.r),
            ("lora_alpha", current.alpha, settings.alpha),
            ("use_rslora", current.use_rslora, settings.use_rslora),
            ("use_dora", current.use_dora, settings.use_dora),
        ]
        if ours != theirs
    ]
    if resolved != set(current.modules):
        differences.append(f"modules: model has LoRA on {len(current.modules)}, adapter targets {len(resolved)}")
    if differences:
        raise UserError("the adapter does not fit the LoRA already in the model: " + "; ".join(differences))
