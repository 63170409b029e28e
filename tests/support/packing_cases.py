"""Packed-vs-separate cases shared by the single-process and the 2-process FSDP2 tests.

A text file and a chat file are packed with the tiny tokenizer; the reference runs every document (text: every
document piece of a block) alone, with targets computed here from the token file and its offsets, not by the
datasets under test.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

SEQ = 96
TEXTS = [
    "The capital of France is Paris.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore.",
    "Question: what is two plus two? Answer: four.",
    "abc",
    "The capital of Italy is Rome. The capital of Spain is Madrid. Question: what colour is the sky? Answer: blue.",
    "Paris, Rome, Madrid.",
]
CHATS = [
    {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "four"}]},
    {"prompt": "Capital of France?", "response": "Paris", "system": "Answer briefly."},
    {
        "messages": [
            {"role": "user", "content": "Sky colour?"},
            {"role": "assistant", "content": "blue"},
            {"role": "user", "content": "And Italy's capital?"},
            {"role": "assistant", "content": "Rome"},
        ]
    },
    {"prompt": "Say abc", "response": "abc"},
    {"prompt": "Capital of Spain?", "response": "Madrid, the capital of Spain."},
    {"prompt": "Lorem?", "response": "ipsum dolor sit amet"},
]


def pack_cases(folder: Path, tokenizer) -> dict[str, Path]:
    from lorafit.data.token_files import pack_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.txt").write_text("\n\n".join(TEXTS * 3) + "\n", encoding="utf-8")
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS * 3), encoding="utf-8")
    return {
        kind: pack_file(folder / name, tokenizer, folder / kind, progress=False).prefix
        for kind, name in (("text", "text.txt"), ("chat", "chat.jsonl"))
    }


def packed_dataset(kind: str, prefix: Path):
    from lorafit.datasets.packed import PackedDataset, PackedInstructionDataset

    return (PackedDataset if kind == "text" else PackedInstructionDataset)(prefix, SEQ)


def _piece(data, start: int, end: int, doc_end: int) -> dict[str, torch.Tensor]:
    """Inputs tokens[start:end] of one document run alone; targets: the next token inside the document."""
    tokens, mask = data.tokens, data.mask
    labels = [
        int(tokens[j + 1]) if j + 1 < doc_end and (mask is None or mask[j + 1]) else -100 for j in range(start, end)
    ]
    return {"input_ids": torch.tensor(tokens[start:end].astype("int64"))[None], "labels": torch.tensor(labels)[None]}


def separate_documents(kind: str, dataset) -> list[dict[str, torch.Tensor]]:
    """What all blocks of `dataset` hold, document by document (text: the pieces that fall into each block)."""
    data = dataset.data
    offsets = [int(o) for o in data.offsets]
    if kind == "chat":  # every conversation, whole: none may be missing, split or duplicated in the blocks
        return [_piece(data, a, b - 1, b) for a, b in itertools.pairwise(offsets)]
    pieces = []
    for block in range(len(dataset)):
        start, end = block * SEQ, (block + 1) * SEQ
        for a, b in itertools.pairwise(offsets):
            if a < end and b > start:
                pieces.append(_piece(data, max(a, start), min(b, end), b))
    return pieces


def count_targets(batches) -> int:
    return sum(int((b["labels"] != -100).sum()) for b in batches)


def loss_and_grads(loss_fn, batches, scale: float) -> tuple[float, dict[str, torch.Tensor]]:
    """Summed token CE over `batches` through lorafit's training loss (`CausalLMLoss`, possibly wrapped, or a
    model to put in one), each backpropagated x `scale`; the gradients by the model's parameter names."""
    from lorafit.models.wrappers import full_tensor, unwrap
    from lorafit.training.loss import CausalLMLoss

    if not isinstance(loss_fn, CausalLMLoss):
        loss_fn = CausalLMLoss(loss_fn)
    model = unwrap(loss_fn)
    total = 0.0
    model.zero_grad(set_to_none=True)
    for batch in batches:
        summed = loss_fn(**batch)
        (summed * scale).backward()
        total += float(summed.detach())
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grads[name] = full_tensor(p.grad).detach().clone()
    return total, grads
