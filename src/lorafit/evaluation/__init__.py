"""Evaluation of a fine-tuned chat model on held-out examples: exact-match accuracy and loss."""

from lorafit.evaluation.chat_scoring import ChatExample, generate_greedy, heldout_loss, score_chat
from lorafit.evaluation.exact_match import (
    ExactMatchEvaluator,
    ExactMatchResult,
    Prediction,
    evaluate_exact_match,
    load_examples,
    normalize,
    render_before_after,
)

__all__ = [
    "ChatExample",
    "ExactMatchEvaluator",
    "ExactMatchResult",
    "Prediction",
    "evaluate_exact_match",
    "generate_greedy",
    "heldout_loss",
    "load_examples",
    "normalize",
    "render_before_after",
    "score_chat",
]
