"""`dataset/text` and `dataset/jsonl_instruction`: raw file + tokenizer, packed into a cache once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorafit.config.context import build_context
from lorafit.config.registry import REGISTRY
from lorafit.datasets.packed import IGNORE_INDEX, InstructionDataset, PackedDataset
from lorafit.errors import UserError


def build(variant: str, **config):
    import lorafit.datasets.text_files  # noqa: F401 - registers the variants

    spec = REGISTRY.get("dataset", variant)
    return spec.builder(spec.config_model.model_validate(config))


def test_text_file_is_packed_once_and_again_when_it_changes(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "data" / "corpus.txt"
    src.parent.mkdir()
    src.write_text("The capital of France is Paris.\n\nLorem ipsum dolor sit amet.\n", encoding="utf-8")
    ds = build("text", path=str(src), tokenizer=tiny_tokenizer, sequence_length=8)
    # the cache goes to lorafit's cache folder, one prefix per source path; nothing is written beside the data
    (cached,) = (tmp_path / "cache" / "datasets").glob("corpus-*.text.bin")
    assert isinstance(ds, PackedDataset) and len(ds) > 0
    assert sorted(p.name for p in src.parent.iterdir()) == ["corpus.txt"]
    packed_at = cached.stat().st_mtime_ns
    again = build("text", path=str(src), tokenizer=tiny_tokenizer, sequence_length=8)
    assert cached.stat().st_mtime_ns == packed_at and len(again) == len(ds)
    src.write_text("Paris.\n", encoding="utf-8")
    os.utime(src, ns=(packed_at + 10**9, packed_at + 10**9))
    small = build("text", path=str(src), tokenizer=tiny_tokenizer, sequence_length=2)
    assert tiny_tokenizer.decode(small.data.tokens.tolist()) == "Paris.<|im_end|>"


def test_jsonl_instruction_with_cache_path(tmp_path, tiny_tokenizer):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"prompt": "two plus two?", "response": "four"}) + "\n", encoding="utf-8")
    ds = build(
        "jsonl_instruction",
        path=str(src),
        tokenizer=tiny_tokenizer,
        cache_path=str(tmp_path / "c" / "chat"),
        sequence_length=64,
    )
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


def _rank_builds(rank: int, world: int, src: str, out: str) -> None:
    import torch.distributed as dist

    from tiny import make_tokenizer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dataset = build("text", path=src, tokenizer=make_tokenizer(), sequence_length=4)
        Path(out, f"rank{rank}.txt").write_text(" ".join(str(int(t)) for t in dataset[0]["input_ids"]))
        # rank 0's refusal to write over a user's file reaches every rank with its field (for the YAML path)
        try:
            build("text", path=src, tokenizer=make_tokenizer(), sequence_length=4, cache_path=str(Path(out, "mine")))
        except UserError as error:
            Path(out, f"error{rank}.txt").write_text(str(error.problems[0].path))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_under_torchrun_rank0_packs_and_other_ranks_read(tmp_path):
    """Two gloo ranks build the same cached dataset: one writer, both see the same tokens."""
    from cli_run import spawn_ranks

    src = tmp_path / "corpus.txt"
    src.write_text("The capital of France is Paris. " * 20, encoding="utf-8")
    (tmp_path / "mine.bin").write_bytes(b"the user's")
    spawn_ranks(_rank_builds, str(src), str(tmp_path))
    assert (tmp_path / "error0.txt").read_text() == (tmp_path / "error1.txt").read_text() == "cache_path"
    assert (tmp_path / "mine.bin").read_bytes() == b"the user's"
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text() != ""
    from lorafit.data.cache_dir import default_dataset_prefix

    cache = default_dataset_prefix(src, "text")
    assert cache.with_name(cache.name + ".json").is_file() and not list(cache.parent.glob("*.tmp*"))


def test_default_cache_folder_follows_xdg_then_home(tmp_path, monkeypatch):
    from lorafit.data.cache_dir import cache_root, default_dataset_prefix

    monkeypatch.delenv("LORAFIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lorafit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lorafit"
    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(tmp_path / "mine"))
    a, b = (
        default_dataset_prefix(tmp_path / "x" / "train.jsonl", "instruction"),
        default_dataset_prefix(tmp_path / "y" / "train.jsonl", "instruction"),
    )
    assert a.parent == b.parent == tmp_path / "mine" / "datasets" and a != b and a.name.startswith("train-")
