"""A readable account of where LoRA sits in a model (for `lorafit validate`); shapes only, so meta works."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from lorafit.lora.model import get_settings, lora_layers, trainable_summary
from lorafit.models.wrappers import canonical_name


@dataclass(frozen=True)
class LoraRow:
    name: str  # qualified module name
    layer: str  # base type: Linear, Embedding, Conv1D, Conv1d/2d/3d
    in_features: int
    out_features: int
    rank: int
    target: str  # the target_layers entry that matched it


def lora_rows(model: nn.Module) -> list[LoraRow]:
    settings = get_settings(model)
    rows = []
    for name, layer in lora_layers(model):
        name = canonical_name(name)
        n_in, n_out = layer.feature_dims
        rows.append(LoraRow(name, layer.base_kind, n_in, n_out, layer.r, settings.modules.get(name, "?")))
    return rows


def _place(name: str) -> str:
    # layer indices collapse to '*', so `c_proj` in attn and in mlp show up as two places
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def describe_lora(model: nn.Module, *, verbose: bool = True) -> str:
    """Settings, one line per target entry (where it landed), one row per adapted module (`verbose`), the
    trainable line."""
    settings = get_settings(model)
    rows = lora_rows(model)
    rule = "alpha/sqrt(r)" if settings.use_rslora else "alpha/r"
    # which factor of an embedding adapter is drawn, where there is one (a Modalities config draws A, PEFT B)
    embedding = f" embedding_init={settings.embedding_init}" if settings.embedding_targets else ""
    lines = [
        f"LoRA r={settings.r} alpha={settings.alpha:g} scaling={settings.scaling:g} ({rule}) "
        f"dropout={settings.dropout:g} init={settings.init}{embedding}: {len(rows)} module{'s' * (len(rows) != 1)}"
    ]
    for entry in dict.fromkeys(settings.target_layers):
        places = Counter(_place(row.name) for row in rows if row.target == entry)
        count = sum(places.values())
        where = ", ".join(f"{place} ({n})" for place, n in places.items()) or "nothing new (an earlier entry)"
        many = f" in {len(places)} places" if len(places) > 1 else ""
        lines.append(f"  target '{entry}': {count} module{'s' * (count != 1)}{many}: {where}")
    if verbose:
        width = max([len("module")] + [len(r.name) for r in rows])
        lines.append(f"  {'module':<{width}}  {'layer':<9}  {'in -> out':<15}  rank")
        for row in rows:
            dims = f"{row.in_features} -> {row.out_features}"
            lines.append(f"  {row.name:<{width}}  {row.layer:<9}  {dims:<15}  {row.rank}")
    lines.append(trainable_summary(model))
    return "\n".join(lines)
