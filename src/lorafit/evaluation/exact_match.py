"""Exact-match accuracy and held-out loss of a chat model on `{"messages": [...]}` jsonl examples: the examples,
the results, and the `exact_match` evaluator component.

An answer is correct when it equals the reference after whitespace normalisation. The greedy answers and the
held-out loss come from evaluation/chat_scoring.py (one prefill of the prompts serves both).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from lorafit.config.registry import ComponentConfig, register_component
from lorafit.errors import UserError
from lorafit.evaluation.chat_scoring import ChatExample, generate_greedy, score_chat


@dataclass(frozen=True)
class Prediction:
    question: str  # the last prompt message's text
    reference: str
    prediction: str

    @property
    def correct(self) -> bool:
        return normalize(self.prediction) == normalize(self.reference)


@dataclass
class ExactMatchResult:
    predictions: list[Prediction]  # in the order of the examples

    @property
    def n(self) -> int:
        return len(self.predictions)

    @property
    def correct(self) -> int:
        return sum(p.correct for p in self.predictions)

    @property
    def accuracy(self) -> float:
        """Fraction in [0, 1] of exactly matched answers (0.0 for no examples)."""
        return self.correct / self.n if self.n else 0.0

    def samples(self, k: int = 3) -> list[Prediction]:
        """The first `k` predictions: a fixed choice, so a before/after pair shows the same prompts."""
        return self.predictions[:k]

    def render_samples(self, k: int = 3) -> str:
        lines = []
        for i, p in enumerate(self.samples(k), 1):
            mark = "correct" if p.correct else "wrong"
            lines += [f"[{i}] {p.question}", f"    expected:  {p.reference}", f"    generated: {p.prediction} ({mark})"]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Numbers and every prediction, in example order (a report shows the first three)."""
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "n": self.n,
            "predictions": [asdict(p) | {"correct": p.correct} for p in self.predictions],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExactMatchResult:
        return cls([Prediction(p["question"], p["reference"], p["prediction"]) for p in data["predictions"]])


def normalize(text: str) -> str:
    """Whitespace-normalised text: runs of whitespace become one space, ends stripped."""
    return " ".join(text.split())


def load_examples(path: str | os.PathLike, limit: int | None = None) -> list[ChatExample]:
    """Read chat jsonl; each line `{"messages": [..., {"role": "assistant", "content": REF}]}`. First `limit` only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"evaluation file not found: {path} (resolved against {Path.cwd()})", field="path")
    examples: list[ChatExample] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(examples) >= limit:
                break
            examples.append(_parse_line(line, f"{path}:{number}"))
    if not examples:
        raise UserError(f"{path} holds no examples", field="path")
    return examples


def _parse_line(line: str, where: str) -> ChatExample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})", field="path") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or len(messages) < 2:
        raise UserError(f"{where}: expected {{'messages': [prompt..., assistant answer]}}", field="path")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: every message needs string 'role' and 'content'", field="path")
    if messages[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: the last message must be the assistant's reference answer, got role '{messages[-1]['role']}'",
            field="path",
        )
    return ChatExample(prompt=[dict(m) for m in messages[:-1]], reference=messages[-1]["content"])


def evaluate_exact_match(
    model,
    tokenizer,
    examples: Sequence[ChatExample],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    device=None,
) -> ExactMatchResult:
    """Greedy-decode every example and compare with its reference after whitespace normalisation."""
    answers = generate_greedy(
        model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device
    )
    return _result(examples, answers)


def _result(examples: Sequence[ChatExample], answers: list[str]) -> ExactMatchResult:
    return ExactMatchResult([Prediction(ex.question, ex.reference, a) for ex, a in zip(examples, answers, strict=True)])


def render_before_after(before: ExactMatchResult | dict, after: ExactMatchResult | dict, k: int = 3) -> str:
    """The first `k` held-out prompts with the reference and the answer before and after fine-tuning."""
    before = before if isinstance(before, ExactMatchResult) else ExactMatchResult.from_dict(before)
    after = after if isinstance(after, ExactMatchResult) else ExactMatchResult.from_dict(after)
    lines = []
    for i, (b, a) in enumerate(zip(before.samples(k), after.samples(k), strict=True), 1):
        lines += [
            f"[{i}] {b.question}",
            f"    expected: {b.reference}",
            f"    before:   {b.prediction!r} ({'correct' if b.correct else 'wrong'})",
            f"    after:    {a.prediction!r} ({'correct' if a.correct else 'wrong'})",
        ]
    return "\n".join(lines)


class ExactMatchEvaluatorConfig(ComponentConfig):
    """Exact-match accuracy and held-out loss on a chat jsonl file (path relative to the working directory)."""

    path: Path
    name: str = "heldout"  # the key of this evaluator's results in eval_before/after.json and the report
    max_new_tokens: int = Field(default=32, ge=1)
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=16, ge=1)


class ExactMatchEvaluator:
    def __init__(self, examples: list[ChatExample], config: ExactMatchEvaluatorConfig):
        self.examples = examples
        self.config = config
        self.name = config.name

    def exact_match(self, model, tokenizer) -> ExactMatchResult:
        return evaluate_exact_match(
            model,
            tokenizer,
            self.examples,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
        )

    def run(self, model, tokenizer) -> dict[str, Any]:
        """{"loss", "accuracy", "correct", "n", "predictions"}, each prediction {"question", "reference",
        "prediction", "correct"} in example order; accuracy is a fraction in [0, 1]."""
        scores = score_chat(
            model,
            tokenizer,
            self.examples,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
        )
        return {"loss": scores.loss} | _result(self.examples, scores.answers).to_dict()


@register_component("evaluator", "exact_match", ExactMatchEvaluatorConfig)
def build_exact_match_evaluator(config: ExactMatchEvaluatorConfig) -> ExactMatchEvaluator:
    """Greedy exact-match accuracy + held-out loss on a chat jsonl file."""
    return ExactMatchEvaluator(load_examples(config.path, limit=config.limit), config)
