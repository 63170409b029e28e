"""The `tokenizer/huggingface` component: a tokenizer from a local Hugging Face folder.

    tokenizer:
      component_key: tokenizer
      variant_key: huggingface
      config:
        path: data/models/SmolLM2-135M
        chat_template: null      # the tokenizer's own; or chatml, llama3, plain, a .jinja file

`chat_template` replaces the tokenizer's own template (lorafit.data.chat_templates): a base model without one can
train on conversations, and every user of this tokenizer (datasets, evaluators, a merged export) renders
conversations the same way. Local files only (no hub); a tokenizer without a pad token gets its EOS token as pad
token, which the collators need for padding and which is never trained on (padding positions are masked out of
the loss).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import field_validator

from lorafit.config.registry import ComponentConfig, register_component
from lorafit.data.chat_templates import check_template_name, use_template
from lorafit.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class HuggingFaceTokenizerConfig(ComponentConfig):
    """A tokenizer from a local folder holding tokenizer.json / tokenizer_config.json (e.g. the model's folder)."""

    path: Path
    chat_template: str | None = None  # null: the tokenizer's own; chatml, llama3, plain, or a Jinja file

    _check_template = field_validator("chat_template")(check_template_name)


@register_component("tokenizer", "huggingface", HuggingFaceTokenizerConfig)
def build_tokenizer(config: HuggingFaceTokenizerConfig):
    """AutoTokenizer from a local folder; pad token = EOS when it has none; `chat_template` when named."""
    return use_template(load_tokenizer(config.path, field="path"), config.chat_template, field="chat_template")


def load_tokenizer(path: str | Path, *, field: str | None = None):
    """`AutoTokenizer.from_pretrained(path)` from local files only, with a pad token; errors are UserErrors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer folder not found: {path}", field=field)
    if not path.is_dir():
        raise UserError(f"{path} is a file: give the folder that holds tokenizer.json", field=field)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise UserError(
            f"no tokenizer in {path}: it has no {' / '.join(TOKENIZER_FILES)} (it holds: {found})", field=field
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # OSError, ValueError, a tokenizers parse error: the files are not usable
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tokenizer in {path}: {text}", field=field) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
