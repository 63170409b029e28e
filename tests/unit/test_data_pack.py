"""Packing text and instruction data with the tiny BPE tokenizer: real files, real token ids, real masks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from lorafit.data.token_files import PackedTokens, pack_file
from lorafit.errors import UserError
from lorafit.models.tokenizer import load_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def trained_text(tok, data: PackedTokens, doc: int) -> str:
    ids, mask = data.document(doc)
    return tok.decode([int(i) for i, m in zip(ids, mask, strict=True) if m])


# --- plain text ---------------------------------------------------------------------------------------------------
def test_txt_paragraphs_are_documents_joined_by_eos(tmp_path, tiny_tokenizer):
    docs = ["The capital of France is Paris.", "Lorem ipsum dolor\nsit amet.", "Answer: four."]
    src = tmp_path / "corpus.txt"
    src.write_text(f"\n{docs[0]}\n\n\n{docs[1]}\n  \n{docs[2]}", encoding="utf-8")
    info = pack_file(src, tiny_tokenizer, tmp_path / "out", progress=False)

    assert (info.kind, info.num_documents, info.dtype) == ("text", 3, "uint16")
    data = PackedTokens(tmp_path / "out")
    assert data.mask is None and data.tokens.dtype == np.uint16
    eos = tiny_tokenizer.eos_token_id
    for i, doc in enumerate(docs):
        ids, _ = data.document(i)
        assert ids[-1] == eos and eos not in ids[:-1]
        assert tiny_tokenizer.decode(ids[:-1].tolist()) == doc
    assert data.offsets[-1] == info.num_tokens == info.num_trained_tokens == len(data.tokens)
    assert (tmp_path / "out.bin").stat().st_size == 2 * info.num_tokens
    meta = json.loads((tmp_path / "out.json").read_text())
    assert meta["tokenizer"]["vocab_size"] == len(tiny_tokenizer) and meta["tokenizer"]["eos_token_id"] == eos
    assert meta["document_offsets"] == data.offsets.tolist() and not meta["has_mask"]


def test_jsonl_text_field_and_blank_lines(tmp_path, tiny_tokenizer):
    src = tmp_path / "d.jsonl"
    src.write_text('{"body": "Paris is the capital."}\n\n{"body": "", "x": 1}\n{"body": "Rome."}\n', encoding="utf-8")
    info = pack_file(src, tiny_tokenizer, tmp_path / "o", jsonl_field="body", progress=False)
    data = PackedTokens(tmp_path / "o.bin")  # the .bin path names the same prefix
    assert (info.num_documents, info.skipped_empty_documents) == (2, 1)
    assert tiny_tokenizer.decode(data.tokens.tolist()) == "Paris is the capital.<|im_end|>Rome.<|im_end|>"


def test_large_vocabulary_uses_uint32(tmp_path):
    class BigVocab:  # just the tokenizer surface pack_file uses; ids above 65535 must survive
        eos_token_id, pad_token_id, bos_token_id, name_or_path = 69_999, None, None, "big"

        def __len__(self):
            return 70_000

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[65_536 + len(t), 69_998] for t in texts]}

    src = tmp_path / "a.txt"
    src.write_text("abc\n\nde\n", encoding="utf-8")
    info = pack_file(src, BigVocab(), tmp_path / "big", progress=False)
    data = PackedTokens(tmp_path / "big")
    assert info.dtype == "uint32" and data.tokens.tolist() == [65_539, 69_998, 69_999, 65_538, 69_998, 69_999]
    assert data.pad_token_id == 69_999  # no pad token: EOS pads


# --- instruction data -----------------------------------------------------------------------------------------------
def test_instruction_mask_covers_exactly_the_answers(tmp_path, tiny_tokenizer):
    src = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": CHAT},
            {"system": "Be kind.", "prompt": "two plus two?", "response": "four"},
            {"prompt": "sky?", "response": "blue"},
        ],
    )
    info = pack_file(src, tiny_tokenizer, tmp_path / "chat", progress=False)
    data = PackedTokens(tmp_path / "chat")
    assert info.kind == "instruction" and data.mask is not None and info.num_documents == 3
    assert trained_text(tiny_tokenizer, data, 0) == "Paris.<|im_end|>Rome.<|im_end|>"
    assert trained_text(tiny_tokenizer, data, 1) == "four<|im_end|>"
    assert trained_text(tiny_tokenizer, data, 2) == "blue<|im_end|>"
    # the tokens are exactly what the chat template gives, system message included
    ids, _ = data.document(1)
    expected = tiny_tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "two plus two?"},
            {"role": "assistant", "content": "four"},
        ],
        tokenize=True,
    )["input_ids"]
    assert ids.tolist() == list(expected)
    assert info.num_trained_tokens == int(data.mask.sum())
    assert (tmp_path / "chat.mask.bin").stat().st_size == info.num_tokens


def test_token_prefix_fallback_gives_the_same_mask(tiny_tokenizer):
    from lorafit.data.chat import render_with_mask

    class SlowView:  # the tokenizer without offsets: the fallback compares token prefixes
        is_fast = False

        def __getattr__(self, name):
            return getattr(tiny_tokenizer, name)

        def __call__(self, text, **kwargs):
            assert "return_offsets_mapping" not in kwargs
            return tiny_tokenizer(text, **kwargs)

    assert render_with_mask(SlowView(), CHAT, "x") == render_with_mask(tiny_tokenizer, CHAT, "x")


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path, tiny_tokenizer):
    tok = load_tokenizer(_saved(tiny_tokenizer, tmp_path))
    # the header counts the messages, so a shorter conversation is no prefix of the longer one
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(UserError, match=r"c.jsonl:1: the chat template is not prefix-stable at message 2"):
        pack_file(src, tok, tmp_path / "o", progress=False)
    assert list(tmp_path.glob("o*")) == []  # nothing half-written


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, r"x.jsonl:2: no 'assistant' message"),
        ({"messages": [{"role": "user"}]}, r"x.jsonl:2: messages\[0\] has no 'content' \(it has: role\)"),
        ({"messages": "hi"}, r"x.jsonl:2: 'messages' must be a non-empty array"),
        ({"messages": [{"role": "assistant", "content": 3}]}, r"x.jsonl:2: messages\[0\].content must be a string"),
        ({"prompt": "hi"}, r"x.jsonl:2: not a prompt_response record .*no 'response' \(the record's fields: 'prompt'"),
        ({"text": "hi"}, r"x.jsonl:2: not a conversation: no 'messages', .*\(the record's fields: 'text'\)"),
    ],
)
def test_bad_instruction_records_name_the_line(tmp_path, tiny_tokenizer, line, message):
    src = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "response": "b"}, line])
    with pytest.raises(UserError, match=message):
        pack_file(src, tiny_tokenizer, tmp_path / "o", progress=False)


# --- bad files -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.txt", b"", r"e.txt: no documents"),
        ("e.txt", b"\n  \n\n", r"e.txt: no documents"),
        ("e.jsonl", b"\n\n", r"e.jsonl: no documents"),
        ("b.txt", b"fine\n\nbad \xff byte\n", r"b.txt:3: not valid UTF-8 \(byte 5 of the line is 0xff\)"),
        ("b.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n', r"b.jsonl:2: not valid UTF-8"),
        ("m.jsonl", b'{"text": "a"}\n{"text": "b"\n', r"m.jsonl:2: not valid JSON \(Expecting ',' delimiter"),
        ("m.jsonl", b'{"text": "a"}\n[1, 2]\n', r"m.jsonl:2: expected a JSON object per line, got array"),
        (
            "f.jsonl",
            b'{"text": "a"}\n{"body": "b", "id": 2}\n',
            r"f.jsonl:2: no 'text' field \(the record's fields: "
            r"'body', 'id'\); name the text field with text_field / --jsonl_field",
        ),
        (
            "f.jsonl",
            b'{"body": "b"}\n',
            r"f.jsonl:1: no 'text' field \(text\) and no conversation: 'messages', 'conversations' \(ShareGPT\).* "
            r"\(the record's fields: 'body'\)",
        ),
        ("t.jsonl", b'{"text": 5}\n', r"t.jsonl:1: field 'text' must be a string, got number"),
        ("s.jsonl", b'{"text": "\\ud800"}\n', r"s.jsonl:1: field 'text' contains an unpaired surrogate"),
    ],
)
def test_bad_files_are_user_errors_naming_the_line(tmp_path, tiny_tokenizer, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        pack_file(tmp_path / name, tiny_tokenizer, tmp_path / "out", progress=False)
    assert list(tmp_path.glob("out*")) == []


def test_missing_input_and_instruction_txt(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match=r"input file not found: .*nope.txt"):
        pack_file(tmp_path / "nope.txt", tiny_tokenizer, tmp_path / "o", progress=False)
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(UserError, match=r"a .txt file is plain text; format .instruction. needs JSON Lines"):
        pack_file(tmp_path / "a.txt", tiny_tokenizer, tmp_path / "o", fmt="instruction", progress=False)


def test_refuses_to_overwrite_unless_asked(tmp_path, tiny_tokenizer):
    chat = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "response": "b"}])
    pack_file(chat, tiny_tokenizer, tmp_path / "o", progress=False)
    (tmp_path / "t.txt").write_text("Paris.\n")
    with pytest.raises(UserError, match=r"o.bin already exists; pass --overwrite"):
        pack_file(tmp_path / "t.txt", tiny_tokenizer, tmp_path / "o", progress=False)
    info = pack_file(tmp_path / "t.txt", tiny_tokenizer, tmp_path / "o", overwrite=True, progress=False)
    # the text pack replaced the instruction pack whole: no stale mask, no temporary files
    assert sorted(p.name for p in tmp_path.glob("o*")) == ["o.bin", "o.json"]
    assert PackedTokens(tmp_path / "o").tokens.tolist()[-1] == tiny_tokenizer.eos_token_id and info.kind == "text"


def test_reader_refuses_incomplete_or_inconsistent_files(tmp_path, tiny_tokenizer):
    (tmp_path / "t.txt").write_text("Paris is the capital of France.\n")
    pack_file(tmp_path / "t.txt", tiny_tokenizer, tmp_path / "o", progress=False)
    with (tmp_path / "o.bin").open("ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match=r"o.bin holds \d+ bytes, its index says \d+"):
        PackedTokens(tmp_path / "o")
    (tmp_path / "o.json").unlink()
    with pytest.raises(UserError, match=r"o.json not found \(the .bin is there: an interrupted write\?\)"):
        PackedTokens(tmp_path / "o")


def _saved(tokenizer, tmp_path: Path) -> Path:
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(folder)
    return folder


def test_load_tokenizer_errors_name_the_path(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match=r"tokenizer folder not found: .*missing"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"no tokenizer in .*empty: it has no tokenizer.json .*\(it holds: notes.txt\)"):
        load_tokenizer(tmp_path / "empty")
    tok = load_tokenizer(_saved(tiny_tokenizer, tmp_path))
    assert tok("Paris")["input_ids"] == tiny_tokenizer("Paris")["input_ids"]


# --- the command ---------------------------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    from lorafit.commands.data import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_data_pack_command(tmp_path, tiny_tokenizer, capsys):
    folder = _saved(tiny_tokenizer, tmp_path)
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}] * 3)
    argv = ["data", "pack", "--input", str(src), "--tokenizer", str(folder), "--output", str(tmp_path / "p")]
    args = _parse([*argv, "--no_progress"])
    assert args.func(args) == 0
    assert "packed 3 instruction documents into" in capsys.readouterr().out
    assert PackedTokens(tmp_path / "p").num_documents == 3
    args = _parse(argv)
    with pytest.raises(UserError, match="already exists"):
        args.func(args)
    args = _parse(["data", "pack", "--input", str(src), "--tokenizer", str(tmp_path / "x"), "--output", "q"])
    with pytest.raises(UserError, match="tokenizer folder not found"):
        args.func(args)
