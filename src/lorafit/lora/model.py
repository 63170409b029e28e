"""Putting LoRA into a model, and the model-level view of it: settings, parameters, freezing, (re)initialisation.

Order that works for large and sharded models (see torchtune/torchtitan): build the model (meta device if
large) -> `apply_lora` (A/B are created on meta too) -> FSDP2 `fully_shard` / DDP -> load base weights ->
`reset_lora_parameters(model, seed)`. Base parameter names do not change, so the base checkpoint loads by
its own keys; only `*.lora_A.weight`, `*.lora_B.weight`, `*.lora_embedding_A/B` are new.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafit.errors import Problem, UserError
from lorafit.lora.embedding import EMBEDDING_INITS
from lorafit.lora.hyper import hyper_problems, lora_scaling
from lorafit.lora.kinds import wrap
from lorafit.lora.layers import LoraLayer
from lorafit.lora.matching import Target, resolve_targets
from lorafit.lora.variants import DECOMPOSING_INITS
from lorafit.models.deferred import is_pending
from lorafit.models.wrappers import canonical_name, is_dtensor, unwrap


@dataclass
class LoraSettings:
    """The LoRA hyper-parameters of a model, kept on it as `model.lora_config` (what save_adapter writes)."""

    r: int
    alpha: float
    target_layers: list[str]  # as given (ours: `q_proj`, `mlp.down_proj`, `re:...`, `all-linear`)
    modules: dict[str, str]  # qualified module name -> the target entry that matched it
    kinds: dict[str, str] = field(
        default_factory=dict
    )  # qualified module name -> Linear / Embedding / Conv1D / Conv2d ...
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    use_dora: bool = False
    embedding_init: str = "peft"  # embeddings' A/B draw: PEFT's or Modalities' (lora/embedding.py)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    @property
    def embedding_targets(self) -> list[str]:
        return sorted({n.rsplit(".", 1)[-1] for n, kind in self.kinds.items() if kind == "Embedding"})

    @property
    def fan_in_fan_out(self) -> bool:
        return any(kind == "Conv1D" for kind in self.kinds.values())


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(name in `unwrap(model)`, layer) for every LoRA layer, in model order."""
    return [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def get_settings(model: nn.Module) -> LoraSettings:
    settings = getattr(unwrap(model), "lora_config", None)
    if not isinstance(settings, LoraSettings):
        raise UserError("the model has no LoRA adapters (apply_lora or load_adapter first)")
    return settings


def named_lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(canonical name, parameter) of every A and B (and DoRA magnitude vector)."""
    for name, layer in lora_layers(model):
        for suffix, param in layer.lora_named_parameters():
            yield f"{canonical_name(name)}.{suffix}", param


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters, e.g. for the optimizer."""
    return [p for _, p in named_lora_parameters(model)]


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze everything except LoRA's A and B."""
    keep = {id(p) for p in lora_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), tied parameters counted once; works on meta and on FSDP2 (global sizes)."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} / {total:,} ({share:.2f}%)"


def inject(
    model: nn.Module,
    settings: LoraSettings,
    targets: list[Target] | list[str],
    *,
    field_name: str,
    each_must_match: bool,
    seed: int | None,
) -> nn.Module:
    """Resolve `targets`, replace each matched module by its LoRA layer, freeze the base, record `settings`."""
    model = unwrap(model)
    if has_lora(model):
        raise UserError(
            f"the model already has LoRA on {len(lora_layers(model))} modules; use merge_and_unload first, "
            "or apply LoRA to a fresh model"
        )
    matched = resolve_targets(model, targets, field=field_name, each_must_match=each_must_match)
    _check_variant_targets(model, settings, matched)
    _check_tied_head(model, matched, field_name)
    # one draw: every layer's A and B from one generator in model order (what reset_lora_parameters(seed) draws)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, entry in matched.items():
        base = model.get_submodule(name)
        layer = wrap(
            base,
            settings.r,
            settings.alpha,
            dropout=settings.dropout,
            use_rslora=settings.use_rslora,
            init=settings.init,
            use_dora=settings.use_dora,
            embedding_init=settings.embedding_init,
            generator=generator,
        )
        _replace(model, name, layer)
        settings.modules[canonical_name(name)] = entry
        settings.kinds[canonical_name(name)] = layer.base_kind
    model.lora_config = settings
    mark_only_lora_trainable(model)
    if settings.init in DECOMPOSING_INITS and not is_pending(model):
        # pissa/olora need the real weights; a deferred build decomposes once they are loaded (init_from_base)
        init_from_base(model)
    return model


def init_from_base(model: nn.Module) -> None:
    """What every adapter takes from its base weight once that holds its final values (loaded; stored in bf16 or
    NF4): pissa/olora decompose it (once), DoRA measures m. Draws nothing: A and B were drawn when created."""
    for _, layer in lora_layers(model):
        layer.init_from_base()


def _check_tied_head(model: nn.Module, matched: dict[str, str], field_name: str) -> None:
    """An output head that shares its weight with the input embeddings (tie_word_embeddings) takes no adapter:
    merging it would change the embeddings too. (LoRA on the embeddings, or on an untied head, trains.)"""
    get_head = getattr(model, "get_output_embeddings", None)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    head = get_head() if callable(get_head) else None
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if head is None or embeddings is None or getattr(head, "weight", None) is not getattr(embeddings, "weight", 0):
        return
    for name in matched:
        if model.get_submodule(name) is head:
            raise UserError(
                f"{canonical_name(name)} shares its weight with the input embeddings (tie_word_embeddings: true), so "
                "an adapter on it could not be merged without changing the embeddings too; drop it from the "
                "targets (LoRA on embed_tokens trains the shared table's input side), or use a model whose head is "
                "not tied",
                field=field_name,
            )


def _check_variant_targets(model: nn.Module, settings: LoraSettings, matched: dict[str, str]) -> None:
    """DoRA and the decomposing inits are defined here for nn.Linear only: name the modules they cannot take."""
    wanted = [
        what
        for what, on in [("use_dora", settings.use_dora), (f"init {settings.init}", settings.init in DECOMPOSING_INITS)]
        if on
    ]
    others = [
        f"{name} ({type(model.get_submodule(name)).__name__})"
        for name in matched
        if type(model.get_submodule(name)) is not nn.Linear
    ]
    if wanted and others:
        listed = ", ".join(others[:4]) + (f", ... ({len(others)} in all)" if len(others) > 4 else "")
        verb = "supports" if len(wanted) == 1 else "support"
        raise UserError(
            f"{' and '.join(wanted)} {verb} nn.Linear targets only, not {listed}: "
            "drop those targets (e.g. embeddings) or the option"
        )


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    target_layers: list[str] | str,
    *,
    dropout: float = 0.0,
    init: str = "kaiming",
    use_rslora: bool = False,
    use_dora: bool = False,
    embedding_init: str = "peft",
    seed: int | None = None,
    warn_save_pretrained: bool = True,
) -> nn.Module:
    """Put LoRA on the modules `target_layers` selects; freeze all else. Returns the same model, changed in place.

    A Hugging Face model keeps its own `save_pretrained`, which would write the LoRA tensors under names its
    `from_pretrained` drops (the reload is the base model): the first call warns and names
    `lorafit.save_pretrained`, which writes a PEFT adapter. lorafit's own builders pass
    `warn_save_pretrained=False` (they save adapters themselves).

    `target_layers` entries: a leaf name (`q_proj`), a dotted suffix (`mlp.down_proj`), `re:<regex>` on the full
    qualified name, or `all-linear` (every Linear/Conv1D except the output head). Naming an nn.Embedding
    (`embed_tokens`) puts LoRA on the embedding. On a meta-device model A/B are created on meta; initialise
    them with `reset_lora_parameters` once real memory exists. `seed` makes the initialisation reproducible.
    `embedding_init`: an embedding adapter starts as PEFT's (`peft`: A = 0, B ~ N(0, 1)) or as Modalities' LoRA
    (`modalities`: A ~ N(0, 1), B = 0); the adapter file is PEFT's either way. nn.Conv1d/2d/3d take PEFT's conv
    adapter (lora/conv.py).
    """
    if isinstance(target_layers, str):
        target_layers = [target_layers]
    problems = hyper_problems(r, alpha, dropout, init)
    if use_dora and init in DECOMPOSING_INITS:
        problems.append(Problem("init", dora_init_conflict(init)))
    if embedding_init not in EMBEDDING_INITS:
        problems.append(
            Problem("embedding_init", f"must be one of {', '.join(EMBEDDING_INITS)}, got {embedding_init!r}")
        )
    if not isinstance(target_layers, list | tuple) or not target_layers:
        problems.append(Problem("target_layers", "must be a non-empty list, e.g. [q_proj, v_proj] or [all-linear]"))
    elif any(not isinstance(t, str) or not t.strip() for t in target_layers):
        problems += [
            Problem(f"target_layers[{i}]", f"must be a non-empty string, got {t!r}")
            for i, t in enumerate(target_layers)
            if not isinstance(t, str) or not t.strip()
        ]
    if problems:
        raise UserError("", problems=problems)
    settings = LoraSettings(
        r=r,
        alpha=float(alpha),
        target_layers=list(target_layers),
        modules={},
        dropout=float(dropout),
        use_rslora=use_rslora,
        init=init,
        use_dora=bool(use_dora),
        embedding_init=embedding_init,
    )
    model = inject(model, settings, list(target_layers), field_name="target_layers", each_must_match=True, seed=seed)
    if warn_save_pretrained and hasattr(model, "save_pretrained"):
        warnings.warn(
            f"{type(model).__name__}.save_pretrained() would not save this LoRA model as anything that loads back "
            "with the adapter (its from_pretrained drops the lora_A/lora_B tensors); use "
            "lorafit.save_pretrained(model, path), which writes a PEFT adapter",
            UserWarning,
            stacklevel=2,
        )
    return model


def dora_init_conflict(init: str) -> str:
    # PEFT's conversion to an adapter on the original base (subtract_mutated_init) has no term for m
    reason = "its saved adapter is converted to apply to the original base, which DoRA's magnitude does not allow"
    return f"{init} cannot be combined with use_dora: {reason}"


def reset_lora_parameters(model: nn.Module, seed: int | None = None, *, keep_decomposed: bool = False) -> None:
    """(Re)initialise every adapter: A kaiming-uniform or gaussian, B zero (embeddings: `embedding_init`).

    With a seed the values are drawn from one generator in model order, so they do not depend on the device,
    dtype or sharding: the same seed gives the same adapter on 1 process or under FSDP2. Meta tensors are
    skipped. Under FSDP2 every rank must call it with the same seed. `keep_decomposed`: pissa/olora layers
    whose base holds the residual already keep it (they draw nothing from the generator; decomposing again
    would first add B0 A0 back onto the residual, which rounds W).
    """
    layers = lora_layers(model)
    if seed is None and any(is_dtensor(p) for _, layer in layers for p in layer.lora_factors()):
        raise ValueError("reset_lora_parameters on a sharded model needs a seed (the same on every rank)")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for _, layer in layers:
        if keep_decomposed and layer.decomposed:
            continue
        layer.reset_lora_parameters(generator)


def remove_lora(model: nn.Module) -> nn.Module:
    """Take the adapters out without merging: the plain base modules (same Parameters) go back in place."""
    model = unwrap(model)
    for name, layer in lora_layers(model):
        if layer.merged:
            layer.unmerge()
        _replace(model, name, layer.to_base())
    model.__dict__.pop("lora_config", None)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
