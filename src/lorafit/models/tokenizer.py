"""The `tokenizer/huggingface` component: a tokenizer from a local Hugging Face folder.

    tokenizer:
      component_key: tokenizer
      variant_key: huggingface
      config: {path: data/models/SmolLM2-135M}

Local files only (no hub); a tokenizer without a pad token gets its EOS token as pad token, which the collators
need for padding and which is never trained on (padding positions are masked out of the loss).
"""

from __future__ import annotations

from pathlib import Path

from lorafit.config.registry import ComponentConfig, register_component
from lorafit.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class HuggingFaceTokenizerConfig(ComponentConfig):
    """A tokenizer from a local folder holding tokenizer.json / tokenizer_config.json (e.g. the model's folder)."""

    path: Path


@register_component("tokenizer", "huggingface", HuggingFaceTokenizerConfig)
def build_tokenizer(config: HuggingFaceTokenizerConfig):
    """AutoTokenizer from a local folder; pad token = EOS when it has none."""
    return load_tokenizer(config.path, field="path")


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
