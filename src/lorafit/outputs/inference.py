"""Loading a base model (+ adapter) for `lorafit merge` and `lorafit generate`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.console import note
from lorafit.data.chat_templates import use_template
from lorafit.errors import UserError
from lorafit.lora import load_adapter
from lorafit.lora.provenance import check_not_merged_already
from lorafit.models.huggingface import load_pretrained_model
from lorafit.models.tokenizer import load_tokenizer
from lorafit.run.build import build_run_entities


def load_base(base: Path, dtype: str = "fp32", flag: str = "--base"):
    """(model, tokenizer) from a Hugging Face folder, or from a run config's `model` and `tokenizer` entities.

    `flag` is the command-line option that named `base` (merge's --base, generate's --model), for messages."""
    base = Path(base)
    if base.suffix in (".yaml", ".yml"):
        entities = build_run_entities(base, ["model", "tokenizer"])
        return entities["model"], entities.get("tokenizer")
    if not (base / "config.json").is_file():
        raise UserError(f"{flag}: {base} is neither a Hugging Face model folder (with config.json) nor a YAML config")

    model = load_pretrained_model(base, dtype=dtype)
    tokenizer = load_tokenizer(base) if (base / "tokenizer_config.json").is_file() else None
    return model, tokenizer


def load_with_adapter(
    base: Path, adapter: Path | None, dtype: str = "fp32", flag: str = "--base", *, chat_template: str | None = None
):
    """(model with the adapter, tokenizer). The tokenizer renders chats with `chat_template` (--chat_template:
    a name or a Jinja file) when given, else with the template saved with the adapter, else with its own."""
    model, tokenizer = load_base(base, dtype, flag)
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"--adapter: {adapter} has no adapter_config.json (expected a PEFT-format adapter folder)")
        if Path(base).is_dir():  # a folder `lorafit merge` made from this very adapter: refuse to add it twice
            check_not_merged_already(Path(base), Path(adapter))
        load_adapter(model, Path(adapter))
    if tokenizer is None and adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(Path(adapter))
    if tokenizer is not None and chat_template is not None:
        use_template(tokenizer, chat_template, field="--chat_template")
    elif tokenizer is not None and adapter is not None:
        use_adapter_chat_template(tokenizer, Path(adapter))
    return model.eval(), tokenizer


def adapter_chat_template(adapter: Path) -> tuple[str, Path] | None:
    """The chat template saved with an adapter (lorafit and transformers write `chat_template.jinja`; older
    tokenizers keep it in `tokenizer_config.json`), and the file it is in; None when it has none."""
    jinja = adapter / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja
    config = adapter / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as error:
        raise UserError(f"--adapter: {config} is not a readable JSON object ({error})") from None
    return (template, config) if isinstance(template, str) else None


def use_adapter_chat_template(tokenizer, adapter: Path) -> None:
    """Render chats as the adapter was trained on them: its saved template replaces the base model's."""
    found = adapter_chat_template(adapter)
    if found is None or found[0] == getattr(tokenizer, "chat_template", None):
        return
    tokenizer.chat_template, source = found
    note(f"chat template: {source}, the one the adapter was trained with (not the model's own)")


@dataclass(frozen=True)
class Sampling:
    """How `generate` picks tokens: greedy at temperature 0, else sampled (top_k 0 and top_p 1: no cut)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0


def generate(model, tokenizer, prompt: str, *, chat: bool, max_new_tokens: int, temperature: float) -> str:
    """One prompt (a user message when `chat`), greedy or sampled at `temperature`."""
    return generate_batch(model, tokenizer, [prompt], chat=chat, sampling=Sampling(max_new_tokens, temperature))[0]


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str | list[dict]], *, chat: bool, sampling: Sampling) -> list[str]:
    """The answers to `prompts`, generated together (left-padded). A prompt is text, or with `chat` a user
    message or a whole conversation (a list of {role, content}) rendered with the chat template."""
    if tokenizer is None:
        raise UserError("generation needs a tokenizer: the model folder has none")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat: the tokenizer has no chat template (name one with --chat_template)")
        conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        encoded = [tokenizer(p)["input_ids"] for p in prompts]
    for prompt, ids in zip(prompts, encoded, strict=True):
        if not ids:  # nothing to condition on: generate() would fail reshaping an empty tensor
            raise UserError(f"--prompt {prompt!r} gives no token to start from; give some text (or use --chat)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for ids in encoded)
    device = next(model.parameters()).device
    # left padding: every prompt ends where generation starts
    ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded], device=device)
    sampled = sampling.temperature > 0
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampled,
        temperature=sampling.temperature if sampled else None,
        # explicit when sampling (1.0 and 0 switch the cuts off), so a model's generation_config.json adds none
        top_p=sampling.top_p if sampled else None,
        top_k=sampling.top_k if sampled else None,
        pad_token_id=pad,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
