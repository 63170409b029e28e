"""Packing and loss masking with the real SmolLM2 tokenizer (ChatML template with a default system prompt)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafit.data.token_files import PackedTokens, pack_file
from lorafit.datasets.packed import IGNORE_INDEX, InstructionDataset, PackedDataset
from lorafit.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Italy?"},
    # the template's "\n" and the answer's "\n\n" merge into one token across the boundary: it stays a prompt token
    {"role": "assistant", "content": "\n\nRome."},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def test_instruction_packing_masks_all_but_the_answers(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    src = tmp_path / "chat.jsonl"
    records = [{"messages": CHAT}, {"system": "Answer in one word.", "prompt": "Sky colour?", "response": "Blue"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    info = pack_file(src, tok, tmp_path / "chat", progress=False)
    data = PackedTokens(tmp_path / "chat")
    assert (info.kind, info.dtype, info.vocab_size) == ("instruction", "uint16", 49152)

    ids, mask = data.document(0)
    assert ids.tolist() == list(tok.apply_chat_template(CHAT, tokenize=True)["input_ids"])
    rendered = tok.decode(ids.tolist())
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # default system
    pieces = [(tok.decode([int(i)]), int(m)) for i, m in zip(ids, mask, strict=True)]
    trained = [p for p, m in pieces if m]
    assert trained == ["Paris", ".", "<|im_end|>", "\n", "Rome", ".", "<|im_end|>"]
    assert pieces[-1] == ("\n", 0)  # the template's newline after the end token is not trained
    assert ("\n\n", 0) in pieces  # the merged boundary token

    ids, mask = data.document(1)
    assert "Answer in one word." in tok.decode(ids.tolist()) and "named SmolLM" not in tok.decode(ids.tolist())
    assert tok.decode([int(i) for i, m in zip(ids, mask, strict=True) if m]) == "Blue<|im_end|>"

    ds = InstructionDataset(tmp_path / "chat", sequence_length=256)
    batch = ds.collate_fn([ds[0], ds[1]])
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == "Paris.<|im_end|>\nRome.<|im_end|>"
    # labels are the next tokens: where a label is trained, it equals the following input
    inputs = batch["input_ids"][0]
    n = int(batch["attention_mask"][0].sum())
    trained_at = (labels[: n - 1] != IGNORE_INDEX).nonzero().flatten()
    assert torch.equal(labels[trained_at], inputs[trained_at + 1])


def test_text_packing_round_trips_lorem_ipsum(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    src = Path(__file__).resolve().parents[2] / "data" / "lorem_ipsum" / "lorem_ipsum.txt"
    info = pack_file(src, tok, tmp_path / "lorem", progress=False)
    data = PackedTokens(tmp_path / "lorem")
    paragraphs = [p for p in src.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    assert info.num_documents == len(paragraphs) and data.tokens.dtype.name == "uint16"
    for i in (0, len(paragraphs) - 1):
        ids, _ = data.document(i)
        assert tok.decode(ids.tolist()) == paragraphs[i].strip() + "<|im_end|>"
    ds = PackedDataset(tmp_path / "lorem", sequence_length=128)
    assert len(ds) == (info.num_tokens - 1) // 128
    item = ds[2]
    crossing = item["labels"] == IGNORE_INDEX  # only where the target would be the next paragraph's first token
    assert crossing.any() and torch.equal(
        item["input_ids"][:-1][crossing[:-1]], torch.full_like(item["input_ids"][:-1][crossing[:-1]], tok.eos_token_id)
    )
    assert torch.equal(item["labels"][:-1][~crossing[:-1]], item["input_ids"][1:][~crossing[:-1]])


def test_smollm2s_default_system_prompt_is_found_and_chatml_adds_none(smollm2_dir):
    from lorafit.data.chat_templates import default_system_prompt, use_template

    own = load_tokenizer(smollm2_dir)
    assert default_system_prompt(own) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    chatml = use_template(load_tokenizer(smollm2_dir), "chatml")  # its markers are SmolLM2's own tokens
    assert default_system_prompt(chatml) is None
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    # the same turns as SmolLM2's own template, without the injected system message
    assert own.apply_chat_template(short, tokenize=False).endswith(chatml.apply_chat_template(short, tokenize=False))
