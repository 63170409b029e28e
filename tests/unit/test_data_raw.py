"""`dataset/text` and `dataset/jsonl_instruction`: raw file + tokenizer, packed into a cache once."""

from __future__ import annotations

import json
import os

import pytest

from lorafit.config.context import build_context
from lorafit.config.registry import REGISTRY
from lorafit.data.datasets import IGNORE_INDEX, InstructionDataset, PackedDataset
from lorafit.errors import UserError


def build(variant: str, **config):
    import lorafit.data.raw  # noqa: F401 - registers the variants

    spec = REGISTRY.get("dataset", variant)
    return spec.builder(spec.config_model.model_validate(config))


def test_text_file_is_packed_once_and_again_when_it_changes(tmp_path, tiny_tokenizer):
    src = tmp_path / "corpus.txt"
    src.write_text("The capital of France is Paris.\n\nLorem ipsum dolor sit amet.\n", encoding="utf-8")
    ds = build("text", path=str(src), tokenizer=tiny_tokenizer, sequence_length=8)
    assert isinstance(ds, PackedDataset) and (tmp_path / "corpus.text.bin").is_file() and len(ds) > 0
    packed_at = (tmp_path / "corpus.text.bin").stat().st_mtime_ns
    again = build("text", path=str(src), tokenizer=tiny_tokenizer, sequence_length=8)
    assert (tmp_path / "corpus.text.bin").stat().st_mtime_ns == packed_at and len(again) == len(ds)
    src.write_text("Paris.\n", encoding="utf-8")
    os.utime(src, ns=(packed_at + 10**9, packed_at + 10**9))
    small = build("text", path=str(src), tokenizer=tiny_tokenizer, sequence_length=2)
    assert tiny_tokenizer.decode(small.data.tokens.tolist()) == "Paris.<|im_end|>"


def test_jsonl_instruction_with_cache_path(tmp_path, tiny_tokenizer):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"prompt": "two plus two?", "response": "four"}) + "\n", encoding="utf-8")
    ds = build("jsonl_instruction", path=str(src), tokenizer=tiny_tokenizer, cache_path=str(tmp_path / "c" / "chat"),
               sequence_length=64)  # fmt: skip
    assert isinstance(ds, InstructionDataset) and (tmp_path / "c" / "chat.mask.bin").is_file()
    labels = ds[0]["labels"]
    assert tiny_tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()) == "four<|im_end|>"


def test_validate_packs_nothing_and_ranks_do_not_race(tmp_path, tiny_tokenizer, monkeypatch):
    src = tmp_path / "corpus.txt"
    src.write_text("Paris.\n", encoding="utf-8")
    with build_context(meta_device=True, load_weights=False):
        build("text", path=str(src), tokenizer=tiny_tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]
    with pytest.raises(UserError, match="file not found: .*nothing.txt") as caught:
        build("text", path=str(tmp_path / "nothing.txt"), tokenizer=tiny_tokenizer)
    assert caught.value.problems[0].path == "path"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"corpus.text.json is missing or out of date; .*lorafit data pack"):
        build("text", path=str(src), tokenizer=tiny_tokenizer)
