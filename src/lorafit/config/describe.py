"""Human-readable descriptions of registered components (for `lorafit components` and docs/configs.md)."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lorafit.config.registry import ComponentMarker, Registry


def type_name(annotation: Any) -> str:
    metadata = getattr(annotation, "__metadata__", None)
    if metadata:
        for item in metadata:
            if isinstance(item, ComponentMarker):
                return "component " + "|".join(item.keys)
        annotation = typing.get_args(annotation)[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None and args:
        inner = ", ".join(type_name(a) for a in args)
        name = getattr(origin, "__name__", str(origin)).replace("UnionType", "Union")
        if name in ("Union", "UnionType"):
            return " | ".join(type_name(a) for a in args)
        return f"{name}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


_CONSTRAINTS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "min length", "max_length": "max length"}


def _constraint_text(metadata: list) -> str:
    parts = []
    for item in metadata:
        for attr, symbol in _CONSTRAINTS.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def field_rows(model: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, constraints) for each field of a config model."""
    rows = []
    for name, field in model.model_fields.items():
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        elif isinstance(field.default, BaseModel):
            default = "(see below)"
        else:
            default = repr(field.default)
        markers = [m for m in field.metadata if isinstance(m, ComponentMarker)]
        tname = "component " + "|".join(markers[0].keys) if markers else type_name(field.annotation)
        notes = field.description or _constraint_text(field.metadata)
        rows.append((name, tname, default, notes))
    return rows


def describe_components(
    registry: Registry,
    only: str | None = None,
    markdown: bool = False,
    builtin_only: bool = False,
    where: typing.Callable[[Any], bool] | None = None,
    fields: bool = True,
) -> str:
    """`builtin_only`: lorafit's own components, not those a user (or a test) registered; `where(spec)`: only
    those it accepts; `fields` False: one line per component (text only)."""
    lines: list[str] = []
    for spec in registry.specs():
        if only and spec.component_key != only:
            continue
        if builtin_only and not spec.builder.__module__.startswith("lorafit."):
            continue
        if where is not None and not where(spec):
            continue
        if not markdown and not fields:
            summary = spec.doc.split(". ")[0].rstrip(".") if spec.doc else ""
            lines.append(f"{spec.component_key} / {spec.variant_key}" + (f"  — {summary}" if summary else ""))
            continue
        if markdown:
            lines += [
                f"### `{spec.component_key}` / `{spec.variant_key}`",
                "",
                spec.doc,
                "",
                "| key | type | default | notes |",
                "|---|---|---|---|",
            ]
            lines += [f"| `{n}` | `{t}` | `{d}` | {c} |" for n, t, d, c in field_rows(spec.config_model)]
            lines.append("")
        else:
            lines.append(f"{spec.component_key} / {spec.variant_key}" + (f"  — {spec.doc}" if spec.doc else ""))
            for name, tname, default, notes in field_rows(spec.config_model):
                lines.append(f"    {name}: {tname} = {default}" + (f"  [{notes}]" if notes else ""))
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
