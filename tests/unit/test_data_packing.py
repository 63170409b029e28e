"""Packing without cross-contamination: a packed batch trains exactly like its documents run one by one.

transformers' own packed-sequence path (position_ids restarting at 0, no 2D mask) must give a block-diagonal
causal mask for sdpa and eager on the installed version; then loss AND gradients of packed blocks (text: documents
that continue across blocks; chat: whole conversations bin-packed, padded to the batch's longest block) equal those
of the documents alone, in fp32, to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from lorafit.datasets.packed import Collator
from packing_cases import SEQ, count_targets, loss_and_grads, pack_cases, packed_dataset, separate_documents


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, tiny_tokenizer):
    return pack_cases(tmp_path_factory.mktemp("packing"), tiny_tokenizer)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_position_restarts_give_a_block_diagonal_causal_mask(impl):
    from transformers.masking_utils import create_causal_mask

    from tiny import llama_config

    config = llama_config()
    config._attn_implementation = impl
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    # the cache positionally: transformers 5.23 names it past_key_values, 5.24 cache
    mask = create_causal_mask(config, torch.zeros(1, 8, 32), None, None, position_ids=position_ids)
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0  # eager: additive, 0 = attend
    document = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    expected = (document[:, None] == document[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["text", "chat"])
def test_packed_batch_equals_documents_one_by_one(prefixes, tiny_tokenizer, kind, impl):
    from tiny import make_llama

    dataset = packed_dataset(kind, prefixes[kind])
    blocks = [dataset[i] for i in range(len(dataset))]
    assert all(len(b["input_ids"]) <= SEQ for b in blocks)
    if kind == "chat":
        assert dataset.plan.too_long == 0 and dataset.plan.dropped_untrained == 0
        assert len({len(b["input_ids"]) for b in blocks}) > 1  # blocks of different lengths: padding is exercised
    collate = Collator(pad_token_id=tiny_tokenizer.pad_token_id)
    packed = [collate(blocks[i : i + 3]) for i in range(0, len(blocks), 3)]
    assert max(int((b["position_ids"] == 0).sum(1).max()) for b in packed) > 2  # several documents in a row
    separate = separate_documents(kind, dataset)
    n_targets = count_targets(separate)
    assert count_targets(packed) == n_targets > 0

    model = make_llama().train()
    model.set_attn_implementation(impl)
    loss_packed, grads_packed = loss_and_grads(model, packed, 1 / n_targets)
    loss_alone, grads_alone = loss_and_grads(model, separate, 1 / n_targets)
    assert loss_packed == pytest.approx(loss_alone, rel=1e-5)
    assert grads_packed.keys() == grads_alone.keys() and len(grads_alone) > 10
    for name, grad in grads_alone.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_without_position_ids_the_documents_would_see_each_other(prefixes, tiny_tokenizer):
    """The control: the same packed batch with the 2D mask alone (no restarts) gives another loss."""
    from lorafit.training.loss import CausalLMLoss
    from tiny import make_llama

    dataset = packed_dataset("chat", prefixes["chat"])
    batch = Collator(pad_token_id=tiny_tokenizer.pad_token_id)([dataset[0], dataset[1]])
    loss_fn = CausalLMLoss(make_llama())
    with torch.no_grad():
        isolated = float(loss_fn(**batch))
        mixed = float(loss_fn(**{k: v for k, v in batch.items() if k != "position_ids"}))
    # fp32 noise is ~1e-7 of it; the random model is near-uniform, so the gap is small but real
    assert abs(isolated - mixed) > 1e-5 * abs(isolated)
