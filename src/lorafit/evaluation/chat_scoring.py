"""Scoring a chat model on `{"messages": [...]}` examples: the held-out loss of the reference answers and the
greedy answers, from one prefill of the prompts.

An example's last message is the assistant's reference answer; the messages before it are the prompt. Each batch
of prompts (chat template with the generation prompt) is computed once into a KV cache, a prefix common to the
batch once for all rows; from that cache the model (1) continues with the reference answers for the loss: the mean
cross-entropy over the reference tokens and the EOS that ends them, the tokens a chat fine-tune trains on; and (2)
answers greedily, stopping at EOS. Padding sits before each row's own tokens, so every row's next token is in the
last column, and the mask and positions make each row see exactly its own prompt.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafit.errors import UserError
from lorafit.models.wrappers import unwrap
from lorafit.training.loss import IGNORE_INDEX, plain_head, summed_causal_lm_loss


@dataclass(frozen=True)
class ChatExample:
    prompt: list[dict[str, str]]  # the messages before the reference, ending with the user's turn
    reference: str  # the last (assistant) message's content

    @property
    def question(self) -> str:
        """The last prompt message's text, for showing samples."""
        return self.prompt[-1]["content"]


def _prompt_ids(tokenizer, example: ChatExample) -> list[int]:
    # Render to text and tokenize without extra specials: the template already holds them, and the same ids
    # start both the generation prompt and the loss sequence, so loss and generation see identical prompts.
    text = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    ids.discard(None)
    if not ids:
        raise UserError("the tokenizer has no eos_token: generation would never stop")
    return sorted(ids)


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


class _EvalMode:
    """Switch a model to eval() for the block and restore its previous mode, so evaluating mid-training is safe."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@dataclass(frozen=True)
class _PromptBatch:
    """Prompts padded to one width with every row's last prompt token in the last column: LEFT-padded, or, with
    `shared` > 0, their common first `shared` tokens in the first columns and the padding after them (the mask
    has a hole there; positions count real tokens only, so each row sees exactly its own prompt)."""

    rows: list[int]  # indices into the examples
    ids: torch.Tensor  # (rows, width)
    mask: torch.Tensor  # 1 on prompt tokens
    shared: int  # leading columns that are the same tokens in every row (0: plain left padding)

    @property
    def lengths(self) -> list[int]:
        """Each row's prompt length."""
        return self.mask.sum(1).tolist()

    @property
    def positions(self) -> torch.Tensor:
        # each prompt's positions count its own tokens from 0, as generate() numbers them from the mask
        return (self.mask.cumsum(-1) - 1).clamp(min=0)


def _common_prefix(prompts: list[list[int]]) -> int:
    shortest = min(map(len, prompts))
    first = prompts[0]
    return next((k for k in range(shortest) if any(p[k] != first[k] for p in prompts)), shortest)


def _prompt_batches(prompts: list[list[int]], batch_size: int, pad_id: int, share: bool) -> list[_PromptBatch]:
    # Similar lengths together: less padding, and the output does not depend on it (padding is masked).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        mine = [prompts[i] for i in rows]
        # every row keeps at least one token after the shared part: its last token starts generation
        shared = min(_common_prefix(mine), min(map(len, mine)) - 1) if share and len(rows) > 1 else 0
        width = shared + max(len(p) - shared for p in mine)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        ids[:, :shared] = torch.tensor(mine[0][:shared])
        mask[:, :shared] = 1
        for row, prompt in enumerate(mine):
            ids[row, width - (len(prompt) - shared) :] = torch.tensor(prompt[shared:])
            mask[row, width - (len(prompt) - shared) :] = 1
        batches.append(_PromptBatch(rows, ids, mask, shared))
    return batches


def _decoder_call(model):
    """The decoder alone where the logits are a plain head over its hidden states (no logits are needed to
    fill a cache), else the whole model with the logits of the last position only where it can (a head with
    an adapter: all positions' logits of 64 SmolLM2 prompts would be 0.7 GB)."""
    parts = plain_head(model)
    if parts is not None:
        return parts[0]
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return functools.partial(model, logits_to_keep=1)
    return model


def _can_share_prefixes(model, token: int, device) -> bool:
    """Whether a common prefix may be cached once for a whole batch: full-attention layers only. A sliding
    window counts cache slots, padding included, so the hole after the prefix would shift it."""
    cache = _decoder_call(model)(input_ids=torch.tensor([[token]], device=device), use_cache=True).past_key_values
    return _can_crop(cache)


def _prefill(model, batch: _PromptBatch, device):
    """The KV cache of every prompt token but the last. The loss of the answers and the generation both start
    from it, so each prompt is computed once per evaluation, not once for the loss and once for generation
    (and a prefix common to the batch, such as a default system prompt, once for the batch); the last token
    stays uncached because generate() needs at least one new token to start from."""
    if batch.ids.shape[1] < 2:
        return None
    call = _decoder_call(model)
    cache = None
    if batch.shared:
        ids = batch.ids[:1, : batch.shared].to(device)
        cache = call(input_ids=ids, position_ids=batch.positions[:1, : batch.shared].to(device), use_cache=True)
        cache = cache.past_key_values
        cache.batch_repeat_interleave(len(batch.rows))
    if batch.ids.shape[1] - 1 > batch.shared:
        cache = call(
            input_ids=batch.ids[:, batch.shared : -1].to(device),
            attention_mask=batch.mask[:, :-1].to(device),
            position_ids=batch.positions[:, batch.shared : -1].to(device),
            past_key_values=cache,
            use_cache=True,
        ).past_key_values
    return cache


def _answer_loss(model, batch: _PromptBatch, cache, answers: list[list[int]], device) -> torch.Tensor:
    """Summed CE of each row's answer (+ EOS) after its prompt, continuing from the prompts' cache. The
    continuation is [last prompt token, answer..., EOS], RIGHT-padded; position t predicts token t+1."""
    rows = [[int(batch.ids[row, -1])] + answers[i] for row, i in enumerate(batch.rows)]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, IGNORE_INDEX)
    positions = torch.zeros_like(ids)
    for row, (seq, length) in enumerate(zip(rows, batch.lengths, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        targets[row, : len(seq) - 1] = torch.tensor(seq[1:])
        positions[row] = length - 1 + torch.arange(width)
    prompt_mask = batch.mask[:, :-1] if cache is not None else batch.mask[:, :0]
    return summed_causal_lm_loss(
        model,
        targets.to(device),
        input_ids=ids.to(device),
        attention_mask=torch.cat([prompt_mask, mask], dim=1).to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=cache is not None,
    )


def _can_crop(cache) -> bool:
    """Whether `cache.crop(-n)` drops the last n positions: a DynamicCache of full-attention layers (the meaning
    of a negative crop in transformers 4.x and 5.x alike). Sliding-window and recurrent layers cannot roll back,
    so the answers' loss runs on a copy of their cache."""
    from transformers.cache_utils import DynamicCache

    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers 4.x: a DynamicCache keeps every position
        return type(cache) is DynamicCache
    from transformers.cache_utils import DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in layers)


@dataclass(frozen=True)
class ChatScores:
    loss: float | None  # mean CE per reference token (+ EOS), None when not asked for
    answers: list[str] | None  # greedy answers in example order, None when not asked for


@torch.no_grad()
def score_chat(
    model,
    tokenizer,
    examples: Sequence[ChatExample],
    *,
    max_new_tokens: int | None,
    loss: bool = True,
    batch_size: int = 16,
    device=None,
) -> ChatScores:
    """The held-out loss (with `loss`) and the greedy answers (with `max_new_tokens`) of `examples`, from one
    prefill of their prompts per batch."""
    from transformers import GenerationConfig

    model = unwrap(model)  # DDP wraps forward only; generate lives on the HF model
    device = torch.device(device) if device is not None else _device_of(model)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos_ids)
    prompts = [_prompt_ids(tokenizer, ex) for ex in examples]
    references = [tokenizer(ex.reference, add_special_tokens=False)["input_ids"] + [eos_ids[0]] for ex in examples]
    # An explicit config, so sampling settings in the model's generation_config.json cannot leak into the greedy run.
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens or 1, eos_token_id=eos_ids, pad_token_id=pad_id
    )
    answers: list[str] = [""] * len(examples)
    total = torch.zeros((), dtype=torch.float64)
    with _EvalMode(model):
        share = _can_share_prefixes(model, prompts[0][0], device) if prompts and prompts[0] else False
        for batch in _prompt_batches(prompts, batch_size, pad_id, share):
            cache = _prefill(model, batch, device)
            if loss:
                rollback = cache is None or _can_crop(cache)
                before = cache.get_seq_length() if cache is not None else 0
                loss_cache = cache if rollback else copy.deepcopy(cache)
                total += _answer_loss(model, batch, loss_cache, references, device).double().cpu()
                if cache is not None and rollback:  # back to the prompts alone for generation
                    cache.crop(before - cache.get_seq_length())
            if not max_new_tokens:
                continue
            width = batch.ids.shape[1]
            out = model.generate(
                input_ids=batch.ids.to(device),
                attention_mask=batch.mask.to(device),
                past_key_values=cache,
                generation_config=config,
                # rank 0 alone evaluates, on a whole (unsharded) model: generate() must not wait at each step
                # for the other ranks (its synced mode all-reduces a flag per step; they are at a barrier)
                synced_gpus=False,
            )
            for row, i in enumerate(batch.rows):
                new = out[row, width:].tolist()
                cut = next((j for j, t in enumerate(new) if t in eos_ids), len(new))
                answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    count = sum(len(r) for r in references)
    return ChatScores(
        loss=float(total) / count if loss else None,
        answers=answers if max_new_tokens else None,
    )


def generate_greedy(
    model, tokenizer, examples: Sequence[ChatExample], *, max_new_tokens: int, batch_size: int = 16, device=None
) -> list[str]:
    """Greedy answers (decoded, special tokens removed, cut at EOS), in the order of `examples`."""
    scores = score_chat(
        model, tokenizer, examples, max_new_tokens=max_new_tokens, loss=False, batch_size=batch_size, device=device
    )
    return scores.answers


def heldout_loss(model, tokenizer, examples: Sequence[ChatExample], *, batch_size: int = 16, device=None) -> float:
    """Mean cross-entropy (nats per token) over every reference token plus its EOS, all examples pooled."""
    return score_chat(model, tokenizer, examples, max_new_tokens=None, batch_size=batch_size, device=device).loss
