"""Reading weight files safely and loading them into a model with errors that name the tensors.

`load_state_dict_file` reads `.safetensors` (also sharded Hugging Face folders) and `.bin` / `.pt` state dicts with
`torch.load(weights_only=True)`: a pickle that would run code when loaded is refused before anything runs.
`load_into` checks keys and shapes first and reports every difference at once (missing, unexpected, shape);
tied parameters (lm_head <-> embed_tokens) may appear once or twice in the file and stay tied after loading.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lorafit.errors import UserError
from lorafit.models.deferred import clear_pending, is_pending

# in a Hugging Face folder, the first of these that exists is the model's weights
FOLDER_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.bin",
)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # {"model": state_dict} as training scripts save it
_LISTED = 8  # names listed per kind of key problem before "... and N more"


def resolve_weights_path(path: str | Path, *, field: str | None = None) -> list[Path]:
    """The file(s) holding the weights at `path`: the file itself, or a Hugging Face folder's (sharded) weights."""
    path = Path(path)
    if not path.exists():
        hint = f" (the folder {path.parent} does not exist either)" if not path.parent.exists() else ""
        raise UserError(f"weights file not found: {path}{hint}", field=field)
    if path.is_dir():
        for name in FOLDER_WEIGHTS:
            if (path / name).is_file():
                return _index_shards(path / name, field) if name.endswith(".index.json") else [path / name]
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise UserError(
            f"no weights in the folder {path} (looked for {', '.join(FOLDER_WEIGHTS)}; it holds: {found})", field=field
        )
    if path.name.endswith(".index.json"):
        return _index_shards(path, field)
    return [path]


def _index_shards(index: Path, field: str | None) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the shard index {index}: {e}", field=field) from None
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise UserError(f"shard {shard.name} named in {index} is missing", field=field)
    return shards


def load_state_dict_file(path: str | Path, *, field: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors in a weights file (or a Hugging Face folder), on the CPU. Never executes pickled code.

    `.safetensors` is read with safetensors; anything else with `torch.load(weights_only=True)` (memory-mapped when
    the file allows). Every failure is a UserError naming the file (and `field`, the config key, when given).
    """
    state: dict[str, torch.Tensor] = {}
    for file in resolve_weights_path(path, field=field):
        loaded = _read_safetensors(file, field) if file.suffix == ".safetensors" else _read_torch(file, field)
        state.update(_as_state_dict(loaded, file, field))
    return state


def _read_safetensors(file: Path, field: str | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: the library's message says which part is broken
        raise UserError(
            f"cannot read {file}: not a valid safetensors file (truncated or corrupt?): {e}", field=field
        ) from None


def _read_torch(file: Path, field: str | None) -> object:
    if file.stat().st_size == 0:
        raise UserError(f"cannot read {file}: the file is empty", field=field)
    try:
        try:
            # mmap: a 500 MB model.bin costs no copy; only files in torch.save's zip format allow it
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "unpickling failed")
        # "WeightsUnpickler error: Unsupported global: GLOBAL builtins.exec was not an allowed global ..."
        reason = reason.split("WeightsUnpickler error:")[-1].split(" was not an allowed global")[0].strip()
        raise UserError(
            f"refused to load {file}: it is not a plain state dict of tensors, and loading it would run pickled code "
            f"({reason}). Only weights are loaded (torch.load with weights_only=True); save the model's "
            "state_dict() with torch.save, or convert it to .safetensors",
            field=field,
        ) from None
    except Exception as e:  # RuntimeError (zip), EOFError, IndexError (garbage opcodes), ...: the file is broken
        raise UserError(
            f"cannot read {file}: not a readable torch state dict (truncated or corrupt?): {e}", field=field
        ) from None


def _as_state_dict(loaded: object, file: Path, field: str | None) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping):
        raise UserError(
            f"{file} holds a {type(loaded).__name__}, expected a state dict (names -> tensors)", field=field
        )
    bad = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{file} is not a plain state dict: {_listing(bad)} hold no tensor", field=field)
    return {str(k): v for k, v in loaded.items()}


# ------------------------------------------------------------------------------------------ loading into a model
def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (e.g. [[model.embed_tokens.weight, lm_head.weight]])."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Make each group one Parameter again (`to_empty` and `load_state_dict(assign=True)` untie them)."""
    for first, *others in groups:
        param = model.get_parameter(first)
        for name in others:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, leaf, param)


def key_problems(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> str | None:
    """Every key and shape difference between `state_dict` and `model` in one message, or None.

    Fills a tied parameter missing from `state_dict` from its partner (files keep tied tensors once).
    """
    expected = model.state_dict(keep_vars=True)
    for group in tied_groups(model):
        present = [n for n in group if n in state_dict]
        if not present:
            continue
        for name in present[1:]:
            a, b = state_dict[present[0]], state_dict[name]
            # values are compared here when loaded (shard_loading compares them part by part after sharding)
            loaded = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            if loaded and a.shape == b.shape and not torch.equal(a, b):
                return (
                    f"{source}: the model ties {present[0]} and {name} (one tensor), but the file holds different "
                    "values for them; was it saved from a model with untied embeddings?"
                )
        for name in group:
            state_dict.setdefault(name, state_dict[present[0]])
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (in the model, not in the file): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (in the file, not in the model): {_listing(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {_listing(shapes)}")
    hint = _prefix_hint(missing, unexpected)
    return f"{source} does not fit the model ({type(model).__name__}): " + "; ".join(parts) + hint


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Say so when the keys differ only by a wrapper prefix (DDP's `module.`, torch.compile's `_orig_mod.`)."""
    if not (missing and unexpected):
        return ""
    for prefix in ("module.", "_orig_mod.", "model.", "base_model.model."):
        stripped = {k.removeprefix(prefix) for k in unexpected if k.startswith(prefix)}
        if len(stripped) == len(unexpected) and stripped >= set(missing):
            return f". The file's names start with '{prefix}' (saved from a wrapped model): strip that prefix"
        if {prefix + k for k in unexpected} >= set(missing):
            return f". The model's names start with '{prefix}' where the file's do not (saved from another class?)"
    return ""


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f", ... and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def load_into(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str = "the checkpoint", field: str | None = None
) -> nn.Module:
    """Load `state_dict` into `model` (strict: keys and shapes checked first, all problems in one error).

    A model on the meta device or with uninitialised weights (see `lorafit.models.deferred`) takes the file's tensors
    as its parameters (no copy, the file's dtype); an initialised one gets them copied in (its own dtype).
    """

    problem = key_problems(model, state_dict, source)
    if problem:
        raise UserError(problem, field=field)
    groups = tied_groups(model)
    assign = is_pending(model) or any(t.is_meta for t in model.state_dict().values())
    if any(t.is_meta for t in state_dict.values()):
        raise UserError(f"{source} holds tensors without data (meta device)", field=field)
    model.load_state_dict(state_dict, strict=True, assign=assign)
    if assign:
        retie(model, groups)
        reinit_nonpersistent_buffers(model)
    clear_pending(model)
    return model


def reinit_nonpersistent_buffers(model: nn.Module, *, force: bool = False) -> None:
    """Recompute buffers no file holds (rotary `inv_freq`) when they are meta or garbage after `to_empty`.

    Hugging Face's `_init_weights` knows how to compute them; only modules that own no parameters are touched, so
    loaded weights are never re-initialised.
    """
    init = getattr(model, "_init_weights", None)
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    for module in model.modules():
        names = getattr(module, "_non_persistent_buffers_set", set())
        if not names or next(module.parameters(recurse=False), None) is not None:
            continue
        buffers = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
        if not (force or any(b.is_meta for b in buffers.values())):
            continue
        if init is None:
            raise UserError(
                f"cannot compute the buffers {sorted(names)} of {type(module).__name__} "
                "after building on the meta device"
            )
        for name, buffer in buffers.items():
            if buffer.is_meta:  # writing into a meta tensor is a no-op: give it storage first
                module._buffers[name] = torch.empty_like(buffer, device=device)
        with torch.no_grad():
            init(module)
