"""Datasets over packed files, the collator, and the `dataset/*` components."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from lorafit.config.context import build_context
from lorafit.config.registry import REGISTRY
from lorafit.data.token_files import PackedTokens, pack_file
from lorafit.datasets.packed import IGNORE_INDEX, Collator, InstructionDataset, PackedDataset, collate
from lorafit.errors import UserError


@pytest.fixture(scope="module")
def packed_text(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("text")
    src = folder / "lorem.txt"
    src.write_text("\n\n".join(["The capital of France is Paris.", "Lorem ipsum dolor sit amet."] * 5), "utf-8")
    pack_file(src, tiny_tokenizer, folder / "text", progress=False)
    return folder / "text"


@pytest.fixture(scope="module")
def packed_chat(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("chat")
    records = [
        {"prompt": "What is the capital of France?", "response": "Paris."},
        {"prompt": "two plus two?", "response": "The answer is four, of course."},
        {"prompt": "A question far longer than the short sequence length used in the test " * 2, "response": "x"},
    ]
    src = folder / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    pack_file(src, tiny_tokenizer, folder / "chat", progress=False)
    return folder / "chat"


def test_packed_blocks_shift_targets_by_one(packed_text):
    data = PackedTokens(packed_text)
    tokens = torch.from_numpy(data.tokens.astype(np.int64))
    ds = PackedDataset(packed_text, sequence_length=16)
    assert len(ds) == (data.num_tokens - 1) // 16
    doc_starts = set(data.offsets.tolist())
    for i in (0, 1, len(ds) - 1, -1):
        item = ds[i]
        start = (i % len(ds)) * 16
        assert torch.equal(item["input_ids"], tokens[start : start + 16])
        # labels[t] is the target of input t, except where that target is the next document's first token
        expected = tokens[start + 1 : start + 17].clone()
        crossing = [t for t in range(16) if start + t + 1 in doc_starts]
        expected[crossing] = IGNORE_INDEX
        assert torch.equal(item["labels"], expected)
        # positions count from each document start inside the block (and from the block start)
        positions, p = [], 0
        for t in range(16):
            p = 0 if t == 0 or start + t in doc_starts else p + 1
            positions.append(p)
        assert item["position_ids"].tolist() == positions
        assert item["input_ids"].dtype == item["labels"].dtype == item["position_ids"].dtype == torch.long
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_packed_blocks_of_instruction_data_mask_prompts(packed_chat):
    data = PackedTokens(packed_chat)
    ds = PackedDataset(packed_chat, sequence_length=8)
    labels = torch.cat([ds[i]["labels"] for i in range(len(ds))])
    covered = data.mask[1 : 1 + len(labels)].copy()
    covered[data.offsets[1:-1] - 1] = 0  # a conversation's first token is no target of the one before
    assert torch.equal(labels == IGNORE_INDEX, torch.from_numpy(covered == 0))
    assert torch.equal(
        labels[labels != IGNORE_INDEX],
        torch.from_numpy(data.tokens[1 : 1 + len(labels)][covered == 1].astype(np.int64)),
    )


def test_instruction_samples_truncate_and_leave_out_prompt_only(packed_chat, tiny_tokenizer, capsys):
    data = PackedTokens(packed_chat)
    long_prompt_tokens = int(data.offsets[3] - data.offsets[2])
    seq = int(data.offsets[2] - data.offsets[1])  # conversation 1 is cut 4 tokens short, 0 fits
    ds = InstructionDataset(packed_chat, sequence_length=seq - 5)
    assert len(ds) == 2 and long_prompt_tokens > seq  # the long prompt has no answer within the cut: left out
    err = capsys.readouterr().err
    assert "2 of 3 conversations are longer" in err and "1 conversations have no answer token" in err
    item = ds[0]
    ids, _ = data.document(0)
    assert torch.equal(item["input_ids"], torch.from_numpy(ids[:-1].astype(np.int64)))
    answer = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert tiny_tokenizer.decode(answer) == "Paris.<|im_end|>"
    cut = ds[1]
    assert len(cut["input_ids"]) == seq - 5
    answer = tiny_tokenizer.decode(cut["labels"][cut["labels"] != IGNORE_INDEX].tolist())
    assert "The answer is four, of course.<|im_end|>".startswith(answer) and len(answer) > 10
    assert not answer.endswith(".") and answer == trained_text(tiny_tokenizer, data, 1, upto=seq - 4)


def test_collator_pads_right_with_ignored_labels(packed_chat):
    ds = InstructionDataset(packed_chat, sequence_length=64)
    a, b = ds[0], ds[1]
    batch = ds.collate_fn([a, b])
    n = max(len(a["input_ids"]), len(b["input_ids"]))
    short = 0 if len(a["input_ids"]) < n else 1
    k = len([a, b][short]["input_ids"])
    assert {key: tuple(v.shape) for key, v in batch.items()} == {key: (2, n) for key in batch}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["attention_mask"][short].tolist() == [1] * k + [0] * (n - k)
    assert (batch["labels"][short, k:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, k:] == PackedTokens(packed_chat).pad_token_id).all()
    fixed = Collator(pad_token_id=7, pad_to=n + 3)([a])
    assert fixed["input_ids"].shape == (1, n + 3) and fixed["input_ids"][0, -1] == 7
    with pytest.raises(ValueError, match="does not fit pad_to"):
        Collator(pad_to=2)([a])
    assert collate([a])["attention_mask"].sum() == len(a["input_ids"])


def test_dataloader_workers_reopen_the_memmap(packed_text):
    ds = PackedDataset(packed_text, sequence_length=8)
    ds[0]  # opened here
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._data is None and len(pickle.dumps(ds)) < 1000  # the tokens are not copied
    assert torch.equal(clone[3]["labels"], ds[3]["labels"])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate_fn)
    first = next(iter(loader))
    assert first["input_ids"].shape == (4, 8) and torch.equal(first["labels"][1], ds[1]["labels"])


def test_a_null_sequence_length_is_the_runs_and_is_checked(packed_text):
    """One source of truth: a dataset without its own length is given settings.step_profile.sequence_length in
    its config when the run is built (lorafit/run/build.py; tests/unit/test_run_sequence_length.py), and checked."""
    with pytest.raises(RuntimeError, match="sequence_length is not set"):
        len(PackedDataset(packed_text))
    ds = _build("packed", path=str(packed_text), sequence_length=4)
    assert ds.sequence_length == 4 and len(ds) == (PackedTokens(packed_text).num_tokens - 1) // 4
    with pytest.raises(UserError, match=r"fewer than one block of sequence_length \+ 1 = 100001"):
        _build("packed", path=str(packed_text), sequence_length=100_000)


def trained_text(tok, data: PackedTokens, doc: int, upto: int) -> str:
    ids, mask = data.document(doc)
    return tok.decode([int(i) for i, m in zip(ids[1:upto], mask[1:upto], strict=True) if m])


def _build(variant: str, **config):
    spec = REGISTRY.get("dataset", variant)
    return spec.builder(spec.config_model.model_validate(config))


def test_components(packed_text, packed_chat, tmp_path, monkeypatch):
    ds = _build("packed", path=str(packed_text) + ".bin", sequence_length=8)
    assert isinstance(ds, PackedDataset) and len(ds) > 0
    ds = _build("instruction", path=str(packed_chat), sequence_length=512)
    assert isinstance(ds, InstructionDataset) and len(ds) == 3
    monkeypatch.chdir(packed_text.parent)  # paths are relative to the working directory
    assert len(_build("packed", path=packed_text.name, sequence_length=8)) == len(PackedDataset(packed_text, 8))
    with pytest.raises(UserError, match=r"nothing.json not found") as caught:
        _build("packed", path="nothing", sequence_length=8)
    assert caught.value.problems[0].path == "path"
    # validate: only that the files exist (a corrupt .bin is found when the run opens it)
    (tmp_path / "x.json").write_text("{}")
    (tmp_path / "x.bin").write_bytes(b"")
    with build_context(meta_device=True, load_weights=False):
        lazy = _build("packed", path=str(tmp_path / "x"))
    assert lazy._data is None
    with pytest.raises(UserError, match="format_version"):
        _build("packed", path=str(tmp_path / "x"))
