"""Property tests of instruction packing: no conversation ever crosses a block, none is lost or duplicated
without being counted, and the bin packing itself never overfills a block."""

from __future__ import annotations

import itertools
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.data.blocks import best_fit_decreasing
from lorafit.data.token_files import PackedTokens, pack_file
from lorafit.datasets.packed import PackedInstructionDataset

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
words = st.lists(
    st.sampled_from(["Paris", "capital", "two", "four", "sky", "blue", "Lorem", "ipsum", "?"]), max_size=12
).map(" ".join)
conversations = st.lists(
    st.tuples(words, words, st.booleans()).map(
        lambda t: {"prompt": t[0], "response": t[1], **({"system": "Be brief."} if t[2] else {})}
    ),
    min_size=1,
    max_size=12,
)


def _segments(item: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The documents of one block: split where the positions restart at 0."""
    ids, labels, positions = (item[k].tolist() for k in ("input_ids", "labels", "position_ids"))
    starts = [t for t, p in enumerate(positions) if p == 0] + [len(ids)]
    assert starts[0] == 0 and all(positions[t] == t - a for a, b in itertools.pairwise(starts) for t in range(a, b))
    return [(tuple(ids[a:b]), tuple(labels[a:b])) for a, b in itertools.pairwise(starts)]


def _expected(data: PackedTokens, doc: int, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ids, mask = data.document(doc)
    labels = [int(t) if m else -100 for t, m in zip(ids[1 : length + 1], mask[1 : length + 1], strict=False)]
    return tuple(int(t) for t in ids[:length]), tuple(labels)


@SETTINGS
@given(records=conversations, seq=st.integers(8, 120), too_long=st.sampled_from(["drop", "truncate"]))
def test_no_conversation_crosses_a_block(tiny_tokenizer, records, seq, too_long):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "chat.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        pack_file(src, tiny_tokenizer, Path(tmp) / "chat", progress=False)
        data = PackedTokens(Path(tmp) / "chat")
        try:
            dataset = PackedInstructionDataset(Path(tmp) / "chat", seq, too_long=too_long)
            dataset.data  # noqa: B018
        except Exception as error:  # only when nothing at all fits: a UserError naming sequence_length
            assert "sequence_length" in str(error) and type(error).__name__ == "UserError"
            return
        got = Counter(seg for i in range(len(dataset)) for seg in _segments(dataset[i]))
        assert all(len(dataset[i]["input_ids"]) <= seq for i in range(len(dataset)))
        expected, over, untrained = Counter(), 0, 0
        for doc in range(data.num_documents):
            positions = int(data.offsets[doc + 1] - data.offsets[doc]) - 1
            if positions > seq:
                over += 1
                if too_long == "drop":
                    continue
            inputs, labels = _expected(data, doc, min(positions, seq))
            if all(y == -100 for y in labels):
                untrained += 1
                continue
            expected[(inputs, labels)] += 1
        assert got == expected  # every kept conversation exactly once, each whole (or cut at the block end)
        plan = dataset.plan
        assert (plan.too_long, plan.dropped_untrained) == (over, untrained)
        assert plan.dropped_too_long == (over if too_long == "drop" else 0)
        assert 0 < plan.efficiency <= 1


@SETTINGS
@given(lengths=st.lists(st.integers(1, 50), max_size=60), capacity=st.integers(50, 80))
def test_best_fit_decreasing_places_every_item_once_within_capacity(lengths, capacity):
    bins = best_fit_decreasing(np.array(lengths, dtype=np.int64), capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # no two bins could have been one: best fit never leaves two bins that together fit in one
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity
    assert bins == best_fit_decreasing(np.array(lengths, dtype=np.int64), capacity)  # deterministic
