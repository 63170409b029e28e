"""Loading a base model (+ adapter) for `lorafit merge` and `lorafit generate`."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.errors import UserError


def load_base(base: Path, dtype: str = "fp32", flag: str = "--base"):
    """(model, tokenizer) from a Hugging Face folder, or from a run config's `model` and `tokenizer` entities.

    `flag` is the command-line option that named `base` (merge's --base, generate's --model), for messages."""
    base = Path(base)
    if base.suffix in (".yaml", ".yml"):
        from lorafit.build import build_run_entities

        entities = build_run_entities(base, ["model", "tokenizer"])
        return entities["model"], entities.get("tokenizer")
    if not (base / "config.json").is_file():
        raise UserError(f"{flag}: {base} is neither a Hugging Face model folder (with config.json) nor a YAML config")
    from lorafit.models.huggingface import load_pretrained_model
    from lorafit.models.tokenizer import load_tokenizer

    model = load_pretrained_model(base, dtype=dtype)
    tokenizer = load_tokenizer(base) if (base / "tokenizer_config.json").is_file() else None
    return model, tokenizer


def load_with_adapter(base: Path, adapter: Path | None, dtype: str = "fp32", flag: str = "--base"):
    model, tokenizer = load_base(base, dtype, flag)
    if adapter is not None:
        from lorafit.lora import load_adapter

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"--adapter: {adapter} has no adapter_config.json (expected a PEFT-format adapter folder)")
        if Path(base).is_dir():  # a folder `lorafit merge` made from this very adapter: refuse to add it twice
            from lorafit.lora.provenance import check_not_merged_already

            check_not_merged_already(Path(base), Path(adapter))
        load_adapter(model, Path(adapter))
    if tokenizer is None and adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        from lorafit.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(adapter))
    return model.eval(), tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, chat: bool, max_new_tokens: int, temperature: float) -> str:
    if tokenizer is None:
        raise UserError("generation needs a tokenizer: the model folder has none")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat: the tokenizer has no chat template")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[-1] == 0:  # nothing to condition on: generate() would fail reshaping an empty tensor
        raise UserError(f"--prompt {prompt!r} gives no token to start from; give some text (or use --chat)")
    ids = ids.to(next(model.parameters()).device)
    sampling = temperature > 0
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
