"""Record formats (OpenAI messages, ShareGPT, Alpaca, prompt/response, text, `columns`), the local `datasets`
loader (Parquet, CSV, JSON arrays, save_to_disk folders; no hub), and the cache keyed by content, tokenizer and
chat template."""

from __future__ import annotations

import json
import os

import pytest

from lorafit.data.formats import FormatReader
from lorafit.data.token_files import PackedTokens, pack_file
from lorafit.errors import UserError

SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Capital of France?"},
        {"from": "gpt", "value": "Paris"},
        {"from": "human", "value": "Italy?"},
        {"from": "gpt", "value": "Rome"},
    ]
}
ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
    {"instruction": "Name the sky's colour.", "input": "", "output": "blue"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def answers(prefix, tokenizer) -> list[str]:
    data = PackedTokens(prefix)
    out = []
    for i in range(data.num_documents):
        ids, mask = data.document(i)
        out.append(tokenizer.decode([int(t) for t, m in zip(ids, mask, strict=True) if m]))
    return out


def test_sharegpt_roles_map_to_chat_roles():
    messages = FormatReader().messages(SHAREGPT, "f.jsonl:1")
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Be brief."),
        ("user", "Capital of France?"),
        ("assistant", "Paris"),
        ("user", "Italy?"),
        ("assistant", "Rome"),
    ]


def test_alpaca_input_follows_the_instruction_after_a_blank_line():
    reader = FormatReader()
    with_input, without = (reader.messages(r, f"a.jsonl:{i}") for i, r in enumerate(ALPACA, 1))
    user, assistant = with_input
    assert user == {"role": "user", "content": "Add the numbers.\n\n2 and 2"} and assistant["content"] == "4"
    assert without[0]["content"] == "Name the sky's colour." and reader.fmt == "alpaca"


@pytest.mark.parametrize(
    ("records", "fmt", "expected"),
    [
        ([SHAREGPT], "sharegpt", ["Paris<|im_end|>Rome<|im_end|>"]),
        (ALPACA, "alpaca", ["4<|im_end|>", "blue<|im_end|>"]),
        (
            [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}],
            "messages",
            ["4<|im_end|>"],
        ),
        ([{"prompt": "2+2?", "response": "4"}], "prompt_response", ["4<|im_end|>"]),
    ],
)
def test_each_format_is_detected_said_and_trains_on_the_answers(
    tmp_path, tiny_tokenizer, capsys, records, fmt, expected
):
    src = write_jsonl(tmp_path / "d.jsonl", records)
    info = pack_file(src, tiny_tokenizer, tmp_path / "d", progress=False)
    assert info.kind == "instruction" and info.format == fmt
    assert f"d.jsonl: format {fmt} (detected from {src}:1)" in capsys.readouterr().out
    assert answers(tmp_path / "d", tiny_tokenizer) == expected


def test_columns_map_other_field_names(tmp_path, tiny_tokenizer, capsys):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4", "id": 1}])
    columns = {"prompt": "question", "response": "answer"}
    pack_file(src, tiny_tokenizer, tmp_path / "qa", columns=columns, progress=False)
    assert answers(tmp_path / "qa", tiny_tokenizer) == ["4<|im_end|>"]
    assert "format prompt_response" in capsys.readouterr().out
    text = write_jsonl(tmp_path / "t.jsonl", [{"body": "Paris"}])
    assert pack_file(text, tiny_tokenizer, tmp_path / "t", columns={"text": "body"}, progress=False).kind == "text"


@pytest.mark.parametrize(
    ("records", "fmt", "columns", "message"),
    [
        (
            [ALPACA[0], {"instruction": "x"}],
            "auto",
            None,
            r"bad.jsonl:2: not a alpaca record .*no 'output' \(the record's fields: 'instruction'\)",
        ),
        (
            [SHAREGPT, {"conversations": [{"from": "robot", "value": "x"}]}],
            "auto",
            None,
            r"bad.jsonl:2: conversations\[0\].from is 'robot'; valid: human, user, gpt",
        ),
        ([{"conversations": [{"from": "human"}]}], "sharegpt", None, r"bad.jsonl:1: conversations\[0\] has no 'value'"),
        ([{"conversations": "hi"}], "auto", None, r"bad.jsonl:1: 'conversations' must be a non-empty array"),
        ([{"prompt": "a", "response": "b"}], "alpaca", None, r"bad.jsonl:1: not a alpaca record: no 'instruction'"),
        ([{"q": "a"}], "auto", {"prompt": "question"}, r"bad.jsonl:1: no field 'question' \(named in columns"),
    ],
)
def test_malformed_records_name_the_file_and_line(tmp_path, tiny_tokenizer, records, fmt, columns, message):
    src = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(UserError, match=message):
        pack_file(src, tiny_tokenizer, tmp_path / "bad", fmt=fmt, columns=columns, progress=False)
    assert not list(tmp_path.glob("bad.*bin*"))  # nothing half-written


# --- the local `datasets` loader -----------------------------------------------------------------------------------
def test_parquet_csv_json_array_and_save_to_disk_are_read_with_datasets(tmp_path, tiny_tokenizer, capsys):
    import datasets

    table = datasets.Dataset.from_list(ALPACA)
    table.to_parquet(str(tmp_path / "a.parquet"))
    table.to_csv(str(tmp_path / "a.csv"), index=False)
    (tmp_path / "a.json").write_text(json.dumps(ALPACA), encoding="utf-8")  # one JSON array, not lines
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.parquet", "a.csv", "a.json"):
        pack_file(tmp_path / name, tiny_tokenizer, tmp_path / f"out_{name}", progress=False)
        assert answers(tmp_path / f"out_{name}", tiny_tokenizer) == ["4<|im_end|>", "blue<|im_end|>"], name
    assert "Generating train split" not in capsys.readouterr().err  # datasets' own bars stay out of the log
    pack_file(tmp_path / "saved", tiny_tokenizer, tmp_path / "out_saved", split="test", progress=False)
    assert answers(tmp_path / "out_saved", tiny_tokenizer) == ["4<|im_end|>"]
    with pytest.raises(UserError, match=r"saved: a saved dataset with splits train, test; choose one with `split`"):
        pack_file(tmp_path / "saved", tiny_tokenizer, tmp_path / "out_nosplit", progress=False)
    bad = datasets.Dataset.from_list([ALPACA[0], {"instruction": "x", "input": "", "output": None}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(UserError, match=r"bad.parquet: row 2: 'output' must be a string, got null"):
        pack_file(tmp_path / "bad.parquet", tiny_tokenizer, tmp_path / "out_bad", progress=False)


def test_a_hub_id_is_refused_without_network(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match=r"tatsu-lab/alpaca: not a local file or folder. lorafit reads no dataset hub"):
        pack_file("tatsu-lab/alpaca", tiny_tokenizer, tmp_path / "x", progress=False)


# --- the cache: keyed by content, tokenizer and chat template -------------------------------------------------------
def _build(path, tokenizer, cache):
    from lorafit.config.context import build_context
    from lorafit.datasets.hf_datasets import HFDatasetsConfig, build_hf_datasets_dataset

    with build_context(load_weights=True):
        config = HFDatasetsConfig.model_construct(
            path=str(path),
            tokenizer=tokenizer,
            cache_path=str(cache),
            sequence_length=64,
            format="auto",
            columns=None,
            text_field="text",
            split=None,
            packing=True,
            too_long="drop",
        )
        return build_hf_datasets_dataset(config)


def test_cache_follows_content_and_chat_template_not_timestamps(tmp_path, tiny_tokenizer):
    import copy

    src = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    cache = tmp_path / "cache" / "a"
    first = _build(src, tiny_tokenizer, cache)
    assert first.plan.num_blocks == 2 and len(first) == 2
    packed_at = (tmp_path / "cache" / "a.bin").stat().st_mtime_ns

    os.utime(src)  # touched, same bytes: the cache stands
    _build(src, tiny_tokenizer, cache)
    assert (tmp_path / "cache" / "a.bin").stat().st_mtime_ns == packed_at

    # same size, same modification time, other bytes: repacked (a size/mtime key would miss this)
    stat = src.stat()
    src.write_bytes(src.read_bytes().replace(b'"4"', b'"5"'))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert answers(cache, tiny_tokenizer) == ["4<|im_end|>", "blue<|im_end|>"]
    _build(src, tiny_tokenizer, cache)
    assert answers(cache, tiny_tokenizer) == ["5<|im_end|>", "blue<|im_end|>"]

    # the chat template edited in place (same tokenizer name and vocabulary): repacked with the new rendering
    edited = copy.deepcopy(tiny_tokenizer)
    edited.chat_template = tiny_tokenizer.chat_template.replace("'<|im_end|>'", "'<|im_end|>' + ' '")
    assert edited.chat_template != tiny_tokenizer.chat_template
    before = PackedTokens(cache).num_tokens
    _build(src, edited, cache)
    assert PackedTokens(cache).num_tokens > before
