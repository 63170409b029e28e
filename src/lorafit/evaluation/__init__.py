"""Evaluation of a fine-tuned chat model on held-out examples: exact-match accuracy and loss."""

from lorafit.evaluation.exact_match import (
    ChatExample,
    ExactMatchEvaluator,
    ExactMatchResult,
    Prediction,
    evaluate_exact_match,
    generate_greedy,
    heldout_loss,
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
]
