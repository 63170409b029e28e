"""`dataset/hf_datasets`: a LOCAL file or folder read with Hugging Face `datasets`, in any record format,
tokenized into a cache on first use (datasets/text_files.py's cache: keyed by content, tokenizer and template).

    train_dataset:
      component_key: dataset
      variant_key: hf_datasets
      config:
        path: data/alpaca.parquet         # .json/.jsonl/.csv/.tsv/.parquet/.arrow, or a save_to_disk folder
        tokenizer: {instance_key: tokenizer, pass_type: BY_REFERENCE}
        format: auto                      # text, messages, sharegpt, alpaca, prompt_response (lorafit.data.formats)
        columns: null                     # format field -> your column, e.g. {instruction: question, output: answer}
        split: null                       # a saved DatasetDict's split (null: its only split)
        packing: true                     # conversations bin-packed whole; text is always cut into blocks
        too_long: drop                    # or truncate (packing only)

Nothing is downloaded: a hub id (`org/name`) is refused with the way to save it locally first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.data.records import check_local
from lorafit.datasets.packed import InstructionDataset, PackedDataset, PackedInstructionDataset
from lorafit.datasets.text_files import build_cached, cache_prefix


class HFDatasetsConfig(ComponentConfig):
    """A local file or `save_to_disk` folder read with `datasets`, tokenized with `tokenizer` into `cache_path`."""

    path: str
    tokenizer: Component("tokenizer")
    cache_path: str | None = None
    sequence_length: int | None = Field(None, ge=1)
    format: Literal["auto", "text", "instruction", "messages", "prompt_response", "sharegpt", "alpaca"] = "auto"
    columns: dict[str, str] | None = None
    text_field: str = "text"
    split: str | None = None
    packing: bool = True
    too_long: Literal["drop", "truncate"] = "drop"


@register_component("dataset", "hf_datasets", HFDatasetsConfig)
def build_hf_datasets_dataset(config: HFDatasetsConfig) -> Any:
    """A local JSON/JSONL/CSV/Parquet/Arrow file or save_to_disk folder, via `datasets`; text or conversations."""
    source = check_local(Path(config.path), field="path")
    prefix = cache_prefix(source, config.cache_path, "lorafit")
    spec = {"format": config.format, "text_field": config.text_field, "columns": config.columns, "split": config.split}

    def make(prefix: Path, kind: str | None) -> Any:
        if kind == "text" or (kind is None and config.format == "text"):
            return PackedDataset(prefix, config.sequence_length)
        if config.packing:
            return PackedInstructionDataset(prefix, config.sequence_length, too_long=config.too_long)
        return InstructionDataset(prefix, config.sequence_length)

    return build_cached(source, config.tokenizer, prefix, spec, make)
