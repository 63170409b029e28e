"""Property tests for the packer: any input ends in a result or a clear UserError, and results are exact."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.data.token_files import PackedTokens, pack_file
from lorafit.errors import UserError

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
EOS = "<|im_end|>"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text()})
records = st.one_of(
    st.dictionaries(st.sampled_from(["text", "messages", "prompt", "response", "system", "x"]), json_values),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}),
    st.fixed_dictionaries({"prompt": st.text(), "response": st.text()}),
    st.fixed_dictionaries({"text": st.text()}),
    json_values,
)


def pack_or_user_error(content: bytes, suffix: str, tokenizer):
    """pack_file on `content`; returns (info, data) or None after a UserError, and never leaves partial output."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"in{suffix}"
        src.write_bytes(content)
        try:
            info = pack_file(src, tokenizer, Path(tmp) / "out", progress=False)
        except UserError as e:
            assert str(e) and f"in{suffix}" in str(e)  # says which file
            assert list(Path(tmp).glob("out*")) == []
            return None
        data = PackedTokens(Path(tmp) / "out")
        assert info.num_documents == data.num_documents > 0 and data.offsets[-1] == info.num_tokens
        assert (data.tokens < len(tokenizer)).all()
        if data.mask is not None:
            assert len(data.mask) == info.num_tokens and int(data.mask.sum()) == info.num_trained_tokens
        return info, [data.document(i)[0].tolist() for i in range(data.num_documents)]


@SETTINGS
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_random_bytes_give_a_result_or_a_user_error(tiny_tokenizer, content, suffix):
    pack_or_user_error(content, suffix, tiny_tokenizer)


@SETTINGS
@given(lines=st.lists(records, max_size=4), blank=st.booleans())
def test_random_jsonl_records_give_a_result_or_a_user_error(tiny_tokenizer, lines, blank):
    text = ("\n\n" if blank else "\n").join(json.dumps(r) for r in lines)
    pack_or_user_error(text.encode("utf-8"), ".jsonl", tiny_tokenizer)


@SETTINGS
@given(docs=st.lists(st.text(min_size=1), min_size=1, max_size=5))
def test_text_documents_round_trip(tiny_tokenizer, docs):
    content = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode("utf-8")
    _, packed = pack_or_user_error(content, ".jsonl", tiny_tokenizer)
    assert len(packed) == len(docs)
    for doc, ids in zip(docs, packed, strict=True):
        assert ids[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(ids) == (doc if doc.endswith(EOS) else doc + EOS)


plain = st.text(st.characters(codec="utf-8", exclude_characters="<|\n\r"), max_size=30)


@SETTINGS
@given(turns=st.lists(st.tuples(plain, plain), min_size=1, max_size=3), system=st.none() | plain)
def test_loss_mask_is_exactly_the_answers(tiny_tokenizer, turns, system):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "c.jsonl"
        src.write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
        pack_file(src, tiny_tokenizer, Path(tmp) / "o", progress=False)
        ids, mask = PackedTokens(Path(tmp) / "o").document(0)
        assert tiny_tokenizer.decode(ids.tolist()) == tiny_tokenizer.apply_chat_template(messages, tokenize=False)
        trained = tiny_tokenizer.decode([int(i) for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "".join(answer + EOS for _, answer in turns)
