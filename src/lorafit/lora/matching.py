"""Which modules of a model get LoRA: the `target_layers` rules.

- a plain name (`q_proj`) matches modules whose leaf name is that name;
- a dotted name (`mlp.down_proj`) matches a suffix of the qualified name (`model.layers.3.mlp.down_proj`);
- `re:<regex>` must match the full qualified name;
- `all-linear` is every nn.Linear / Conv1D except the output head (`get_output_embeddings()`, else `lm_head`).

Plain and dotted names are exactly PEFT's list semantics for `target_modules`, and `re:` its string form, so
an adapter's `target_modules` can be read back through the same code. Every problem is collected and raised
once, each located at `target_layers[i]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.errors import Problem, UserError, did_you_mean, nearest
from lorafit.frozen.linear import output_head
from lorafit.frozen.nf4 import NF4_BLOCK
from lorafit.lora.kinds import LORA_CLASSES, SUPPORTED_TYPES
from lorafit.lora.layers import LoraLayer

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Target:
    """One parsed `target_layers` entry."""

    kind: str  # "name" (leaf or dotted suffix), "regex" or "all-linear"
    value: str
    text: str  # as the user wrote it

    def matches(self, name: str) -> bool:
        if self.kind == "regex":
            return re.fullmatch(self.value, name) is not None
        return name == self.value or name.endswith("." + self.value)


def parse_target(text: str) -> Target:
    text = str(text).strip()
    if text.lower() == ALL_LINEAR:
        return Target("all-linear", ALL_LINEAR, text)
    if text.startswith("re:"):
        return Target("regex", text[3:], text)
    return Target("name", text, text)


@dataclass(frozen=True)
class Candidate:
    name: str
    module: nn.Module
    kind: str | None  # "Linear", "Embedding", "Conv1D", "Conv2d"... for what LoRA can wrap; None otherwise
    linear_like: bool  # counts for all-linear
    refusal: str | None = None  # a wrappable type that this module's settings rule out (a grouped conv): why


def candidates(model: nn.Module) -> list[Candidate]:
    """Every named submodule that a target could hit, LoRA layers as their base type, LoRA internals skipped."""
    found: list[Candidate] = []
    lora_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in lora_prefixes):
            continue
        if isinstance(module, LoraLayer):
            lora_prefixes.append(name + ".")
            found.append(Candidate(name, module, module.base_kind, module.base_kind in ("Linear", "Conv1D")))
            continue
        cls = LORA_CLASSES.get(type(module))
        refusal = cls.refusal(module) if cls is not None else None
        kind = cls.base_kind if cls is not None and refusal is None else None
        found.append(Candidate(name, module, kind, isinstance(module, (nn.Linear, Conv1D)), refusal))
    return found


def output_head_names(model: nn.Module, cands: list[Candidate]) -> set[str]:
    """The output projection that `all-linear` leaves out (PEFT does the same)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is not None:
        return {c.name for c in cands if c.module is head}
    return {c.name for c in cands if c.name.rsplit(".", 1)[-1] == "lm_head"}


def _no_match_message(target: Target, cands: list[Candidate]) -> str:
    wrappable = [c for c in cands if c.kind is not None]
    leaves = sorted({c.name.rsplit(".", 1)[-1] for c in wrappable})
    if target.kind == "all-linear":
        return "'all-linear' found no nn.Linear or Conv1D layer other than the output head"
    hint = ""
    if target.kind == "name":
        depth = target.value.count(".") + 1
        # compare like with like: a dotted entry against the dotted suffixes of the same length
        choices = sorted({".".join(c.name.split(".")[-depth:]) for c in wrappable})
        best = nearest(target.value, choices)
        hint = f" (did you mean '{best}'?)" if best else ""
    elif target.kind == "regex":
        examples = ", ".join(c.name for c in wrappable[:3])
        hint = f" (it must match the whole qualified name, e.g. {examples})"
    return f"'{target.text}' matches no module{hint}. LoRA-capable layers here: {', '.join(leaves) or 'none'}"


def _by_type(cands: list[Candidate]) -> str:
    groups: dict[str, list[str]] = {}
    for c in cands:
        groups.setdefault(type(c.module).__name__, []).append(c.name)
    parts = []
    for type_name, names in groups.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{shown} ({type_name})")
    return "; ".join(parts)


def resolve_targets(
    model: nn.Module,
    targets: list[str] | list[Target],
    *,
    field: str = "target_layers",
    each_must_match: bool = True,
) -> dict[str, str]:
    """Qualified module name -> the entry that matched it first, in model order.

    Raises one UserError collecting every problem: an entry that matches nothing (with `each_must_match`;
    otherwise only when nothing matches at all, PEFT's rule), a bad regex, a matched module of a type
    LoRA cannot wrap.
    """
    parsed = [t if isinstance(t, Target) else parse_target(t) for t in targets]
    if not parsed:
        raise UserError("no target layers given (e.g. [q_proj, v_proj] or [all-linear])", field=field)
    cands = candidates(model)
    heads = output_head_names(model, cands)
    problems: list[Problem] = []
    chosen: dict[str, str] = {}
    unmatched: list[tuple[int, Target]] = []
    for i, target in enumerate(parsed):
        where = f"{field}[{i}]"
        if target.kind == "regex":
            try:
                re.compile(target.value)
            except re.error as error:
                problems.append(Problem(where, f"'{target.text}' is not a valid regular expression: {error}"))
                continue
        if target.kind == "all-linear":
            hits = [c for c in cands if c.linear_like and c.name not in heads]
        else:
            hits = [c for c in cands if target.matches(c.name)]
        if not hits:
            unmatched.append((i, target))
            continue
        refused = [c for c in hits if c.refusal is not None]
        for c in refused:
            problems.append(
                Problem(
                    where,
                    f"'{target.text}' matched {c.name} ({type(c.module).__name__}), which "
                    f"LoRA cannot wrap with {c.refusal}",
                )
            )
        bad = [c for c in hits if c.kind is None and c.refusal is None]
        if bad:
            problems.append(
                Problem(
                    where,
                    f"'{target.text}' matched {_by_type(bad)}, which LoRA cannot wrap; supported: {SUPPORTED_TYPES}",
                )
            )
        for c in hits:
            if c.kind is not None:
                chosen.setdefault(c.name, target.text)
    if each_must_match or not chosen:
        problems += [Problem(f"{field}[{i}]", _no_match_message(t, cands)) for i, t in unmatched]
    if problems:
        raise UserError("", problems=problems)
    order = {c.name: k for k, c in enumerate(cands)}
    return dict(sorted(chosen.items(), key=lambda item: order[item[0]]))


def nf4_skip_names(model: nn.Module, entries: list[str], field: str = "nf4_skip_layers") -> set[str]:
    """The qualified names of the layers `entries` (target_layers' rules) select among those `store_nf4_linears`
    would store as NF4: nn.Linear layers other than the output head, with a multiple of 64 weights. An entry that
    selects none of them (the head, an embedding, a whole attention block, a misspelling) is refused by name."""
    head = output_head(model)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    quantisable = [name for name, module in linears if not module.weight.numel() % NF4_BLOCK]
    chosen, problems = set(), []
    for i, text in enumerate(entries):
        target = parse_target(text)
        try:
            hits = {n for n in quantisable if target.kind == "all-linear" or target.matches(n)}
        except re.error as error:
            problems.append(Problem(f"{field}[{i}]", f"'{text}' is not a valid regular expression: {error}"))
            continue
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in quantisable})
            hint = did_you_mean(target.value, leaves)
            problems.append(
                Problem(
                    f"{field}[{i}]",
                    f"'{text}' selects no layer that frozen_dtype nf4 stores in 4-bit "
                    f"(linear layers other than the output head, a multiple of {NF4_BLOCK} weights: "
                    f"{', '.join(leaves)}){hint}",
                )
            )
        chosen |= hits
    if problems:
        raise UserError("", problems=problems)
    return chosen
