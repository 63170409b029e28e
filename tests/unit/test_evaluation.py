"""Exact-match evaluator and held-out loss on the tiny Llama: real generation, compared with plain reference loops."""

from __future__ import annotations

import json

import pytest
import torch

from lorafit.errors import UserError
from lorafit.evaluation import (
    ChatExample,
    ExactMatchResult,
    Prediction,
    evaluate_exact_match,
    heldout_loss,
    load_examples,
    normalize,
    render_before_after,
)
from lorafit.evaluation.chat_scoring import _prompt_ids

QUESTIONS = [
    "What colour is the sky?",
    "Question: what is two plus two? Answer with one word, please, and nothing else at all.",
    "Lorem ipsum",
    "The capital of Spain is",
    "abc",
]


def chat(question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def tiny():
    from tiny import make_llama, make_tokenizer

    # a wide init: the default (0.02) makes a random model repeat one token, which would hide ordering bugs
    return make_llama(seed=3, initializer_range=0.5), make_tokenizer()


def examples(answers=None) -> list[ChatExample]:
    answers = answers or ["x"] * len(QUESTIONS)
    return [ChatExample([{"role": "user", "content": q}], a) for q, a in zip(QUESTIONS, answers, strict=True)]


def greedy_reference(model, tokenizer, example: ChatExample, max_new_tokens: int, eos: set[int]) -> list[int]:
    """One example, no padding, no KV cache, full recompute each step: the plainest greedy decoder."""
    ids = _prompt_ids(tokenizer, example)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            new.append(token)
    return new


def test_load_examples_reads_prompt_and_reference(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [chat("q1", "a1", system="be brief"), chat("q2", "a2"), chat("q3", "a3")])
    got = load_examples(path)
    assert [e.reference for e in got] == ["a1", "a2", "a3"]
    assert got[0].prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"}]
    assert got[0].question == "q1"
    assert [e.reference for e in load_examples(path, limit=2)] == ["a1", "a2"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "d.jsonl:2: not valid JSON"),
        ('{"text": "hello"}', "d.jsonl:2: expected {'messages'"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"}]}', "role 'user'"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "r"}]}', "string 'role' and 'content'"),
    ],
)
def test_load_examples_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("q", "a")) + "\n" + line + "\n")
    with pytest.raises(UserError, match="^path: ") as info:
        load_examples(path)
    assert message in str(info.value)


def test_load_examples_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="evaluation file not found"):
        load_examples(tmp_path / "nope.jsonl")


def test_normalize_collapses_whitespace():
    assert normalize("  name=Ada  Quinn;\n age=41\t") == "name=Ada Quinn; age=41"
    assert Prediction("q", "a  b", " a b\n").correct
    assert not Prediction("q", "a b", "ab").correct


def test_batched_left_padded_greedy_equals_one_by_one_reference(tiny):
    model, tokenizer = tiny
    exs = examples()
    lengths = {len(_prompt_ids(tokenizer, e)) for e in exs}
    assert len(lengths) == len(exs)  # different lengths: the batch really is padded
    batched = evaluate_exact_match(model, tokenizer, exs, max_new_tokens=10, batch_size=8)
    single = evaluate_exact_match(model, tokenizer, exs, max_new_tokens=10, batch_size=1)
    eos = {tokenizer.eos_token_id}
    tokens = [greedy_reference(model, tokenizer, e, 10, eos) for e in exs]
    expected = [tokenizer.decode(t) for t in tokens]
    assert [p.prediction for p in batched.predictions] == expected
    assert [p.prediction for p in single.predictions] == expected
    assert len(set(expected)) == len(expected)  # distinct answers: a mix-up of rows would show
    assert sorted(len(t) for t in tokens)[0] < 10  # one row ends at EOS while the others go on
    assert not model.training


def test_accuracy_counts_exact_matches_in_example_order(tiny):
    model, tokenizer = tiny
    answers = [p.prediction for p in evaluate_exact_match(model, tokenizer, examples(), max_new_tokens=5).predictions]
    # references: three are the model's own answer (one with extra whitespace), two are not
    refs = [answers[0], "  " + answers[1].replace(" ", "   ") + " \n", "wrong", answers[3], answers[4] + "x"]
    result = evaluate_exact_match(model, tokenizer, examples(refs), max_new_tokens=5, batch_size=2)
    assert [p.correct for p in result.predictions] == [True, True, False, True, False]
    assert (result.n, result.correct, result.accuracy) == (5, 3, 0.6)
    assert [p.question for p in result.predictions] == QUESTIONS
    data = result.to_dict()
    assert data["accuracy"] == 0.6 and len(data["predictions"]) == 5 and data["predictions"][2]["correct"] is False
    assert data["predictions"][1] == {
        "question": QUESTIONS[1],
        "reference": refs[1],
        "prediction": answers[1],
        "correct": True,
    }
    assert ExactMatchResult.from_dict(json.loads(json.dumps(data))).predictions == result.predictions


def test_generation_stops_at_eos(tiny):
    from tiny import make_tokenizer

    model, tokenizer = tiny
    ex = examples()[1]
    free = greedy_reference(model, tokenizer, ex, 8, {tokenizer.eos_token_id})
    # declare a token the model generates (first at position k >= 3) the end-of-sequence token
    k = next(k for k in range(3, len(free)) if free[k] not in free[:k])
    tok = make_tokenizer()
    tok.eos_token = tok.convert_ids_to_tokens(free[k])
    assert tok.eos_token_id == free[k]
    got = evaluate_exact_match(model, tok, [ex], max_new_tokens=8).predictions[0].prediction
    assert got == tok.decode(free[:k])
    assert got != tok.decode(free)


def test_heldout_loss_is_token_weighted_mean_over_reference_and_eos(tiny):
    model, tokenizer = tiny
    exs = examples(["blue", "four", "dolor sit amet", "Madrid", "d e f g h"])
    total, count = 0.0, 0
    for e in exs:  # one unpadded sequence at a time, HF's own shifted loss
        prompt = _prompt_ids(tokenizer, e)
        answer = tokenizer(e.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = torch.tensor([[-100] * len(prompt) + answer])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([prompt + answer]), labels=labels).loss
        total += loss.item() * len(answer)
        count += len(answer)
    assert heldout_loss(model, tokenizer, exs, batch_size=2) == pytest.approx(total / count, rel=1e-5)
    assert heldout_loss(model, tokenizer, exs, batch_size=16) == pytest.approx(total / count, rel=1e-5)


def test_render_before_after_shows_the_same_three_prompts():
    before = ExactMatchResult([Prediction(f"q{i}", f"r{i}", "nope") for i in range(5)])
    after = ExactMatchResult([Prediction(f"q{i}", f"r{i}", f"r{i}") for i in range(5)])
    text = render_before_after(before, after.to_dict())
    assert [line for line in text.splitlines() if line.startswith("[")] == ["[1] q0", "[2] q1", "[3] q2"]
    assert "before:   'nope' (wrong)" in text and "after:    'r2' (correct)" in text
    assert "q3" not in text
    assert before.render_samples(2).count("expected:") == 2


def test_component_builds_and_runs(tmp_path, tiny, monkeypatch):
    from lorafit.config.registry import REGISTRY
    from lorafit.run.report import render_report

    model, tokenizer = tiny
    write_jsonl(tmp_path / "held.jsonl", [chat(q, "blue") for q in QUESTIONS])
    monkeypatch.chdir(tmp_path)  # paths in configs are relative to the working directory
    spec = REGISTRY.get("evaluator", "exact_match")
    config = spec.config_model.model_validate({"path": "held.jsonl", "limit": 3, "max_new_tokens": 4})
    evaluator = spec.builder(config)
    model.train()  # evaluating mid-training: eval mode inside, training mode restored after
    try:
        out = evaluator.run(model, tokenizer)
        assert model.training
    finally:
        model.eval()
    assert evaluator.name == "heldout"
    assert set(out) == {"loss", "accuracy", "correct", "n", "predictions"}
    assert out["n"] == 3 and len(out["predictions"]) == 3 and out["loss"] > 0
    assert out["loss"] == pytest.approx(heldout_loss(model, tokenizer, load_examples("held.jsonl", limit=3)))
    # what the runner writes to eval_*.json and the report shows
    for when in ("before", "after"):
        (tmp_path / f"eval_{when}.json").write_text(json.dumps({"heldout": out}))
    report = render_report(tmp_path)
    assert "| evaluators.heldout | accuracy |" in report and "| evaluators.heldout | loss |" in report
    assert repr(QUESTIONS[2]) in report and "### sample 3 (heldout)" in report
    with pytest.raises(ValueError, match="extra"):
        spec.config_model.model_validate({"path": "held.jsonl", "max_tokens": 4})
    with pytest.raises(UserError, match="^path: evaluation file not found"):
        spec.builder(spec.config_model.model_validate({"path": "missing.jsonl"}))


def _sliding_window_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    from tiny import LLAMA

    torch.manual_seed(5)
    config = MistralConfig(**{k: v for k, v in LLAMA.items() if k != "rope_theta"}, sliding_window=4)
    return MistralForCausalLM(config).eval()


def _lora_on_the_head():
    """LoRA on lm_head (B nonzero): the logits are no longer a plain head over the decoder, so the model's own
    forward fills the cache."""
    from lorafit.lora.model import apply_lora
    from tiny import make_llama

    model = apply_lora(
        make_llama(seed=6, tie_word_embeddings=False), 2, 4, ["lm_head", "q_proj"], seed=1, warn_save_pretrained=False
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval()


def _softcapped_gemma2():
    """Logits soft-capped after the head: not a plain head, so the model's own forward (last position's logits
    only) fills the cache and computes the loss."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(7)
    from tiny import LLAMA

    values = {k: v for k, v in LLAMA.items() if k != "rope_theta"}
    config = Gemma2Config(**values, head_dim=8, final_logit_softcapping=5.0)
    return Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("system", [None, "You are a terse assistant: answer with one word."])
@pytest.mark.parametrize("kind", ["llama", "sliding_window", "gpt2", "lora_head", "softcap"])
def test_one_prefill_serves_loss_and_answers_as_separate_references_do(tiny, kind, system):
    """The evaluator computes each batch's prompts once and continues from their cache twice: the answers' loss
    (then the cache is cut back to the prompts, or a copy is used where it cannot be cut: sliding-window layers)
    and the greedy answers; a prefix common to the batch (the system prompt) is computed once and the padding
    sits after it. Both equal plain references that recompute everything per example."""
    from lorafit.evaluation.chat_scoring import _can_crop, _can_share_prefixes, _prompt_batches, score_chat
    from tiny import make_gpt2

    _, tokenizer = tiny
    model = {
        "llama": lambda: tiny[0],
        "sliding_window": _sliding_window_mistral,
        "gpt2": lambda: make_gpt2(seed=4, vocab_size=384, n_positions=128),
        "lora_head": _lora_on_the_head,
        "softcap": _softcapped_gemma2,
    }
    model = model[kind]()
    if kind == "sliding_window":  # the prompts are longer than the window: its cache cannot roll back
        out = model(torch.tensor([[5, 6, 7, 8, 9, 10]]), use_cache=True)
        assert not _can_crop(out.past_key_values)
    exs = examples(["blue", "four", "dolor sit amet", "Madrid", "d e f g h"])
    if system:
        exs = [ChatExample([{"role": "system", "content": system}, *e.prompt], e.reference) for e in exs]
    prompts = [_prompt_ids(tokenizer, e) for e in exs]
    share = _can_share_prefixes(model, prompts[0][0], "cpu")
    assert share == (kind not in ("sliding_window", "softcap"))  # Gemma 2 alternates sliding-window layers
    shared = _prompt_batches(prompts, 16, 0, share)[0].shared
    if not share:
        assert shared == 0
    else:  # the chat template's user header at least; with a system prompt, the whole system turn too
        assert shared >= (12 if system else 3)
    eos = {tokenizer.eos_token_id}
    total, count = 0.0, 0
    for e in exs:
        prompt = _prompt_ids(tokenizer, e)
        answer = tokenizer(e.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            loss = model(
                input_ids=torch.tensor([prompt + answer]), labels=torch.tensor([[-100] * len(prompt) + answer])
            )
        total += loss.loss.item() * len(answer)
        count += len(answer)
    expected = [tokenizer.decode(greedy_reference(model, tokenizer, e, 6, eos)) for e in exs]
    for batch_size in (2, 16):
        scores = score_chat(model, tokenizer, exs, max_new_tokens=6, batch_size=batch_size)
        assert scores.loss == pytest.approx(total / count, rel=1e-5)
        assert scores.answers == expected
