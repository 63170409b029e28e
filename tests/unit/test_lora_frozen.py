"""Frozen base weights stored in bf16 compute what an fp32 model with bf16-rounded weights computes, and keep
no fp32 copy of them for backward."""

from __future__ import annotations

import copy

import torch

TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_pair():
    """(model with bf16-stored frozen linears, fp32 model whose base was rounded to bf16): the same function."""
    from lorafit.frozen.linear import store_frozen_linears
    from lorafit.lora import apply_lora
    from tiny import make_llama

    model = apply_lora(make_llama(), r=4, alpha=8, target_layers=TARGETS, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    reference = copy.deepcopy(model)
    changed = store_frozen_linears(model, torch.bfloat16)
    head = reference.get_output_embeddings()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.Linear) and module is not head and not module.weight.requires_grad:
                module.weight.copy_(module.weight.bfloat16().float())
    return model, reference, changed


def test_bf16_storage_computes_the_rounded_base_in_fp32_and_saves_only_bf16_weights():
    from lorafit.lora import lora_parameters

    model, reference, changed = lora_pair()
    config = model.config
    assert changed == config.num_hidden_layers * 7  # q, k, v, o, gate, up, down; not the head
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    ids = torch.randint(3, 384, (2, 9), generator=torch.Generator().manual_seed(1))

    def run(m):
        saved: dict[int, int] = {}  # storage -> bytes kept for backward (weights included)

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(input_ids=ids, labels=ids).loss
        return loss, torch.autograd.grad(loss, lora_parameters(m)), saved

    def frozen_weight_bytes(m, saved):
        ptrs = {
            x.weight.untyped_storage().data_ptr()
            for x in m.modules()
            if isinstance(x, torch.nn.Linear) and x is not m.lm_head
        }
        return sum(n for ptr, n in saved.items() if ptr in ptrs)

    got, got_grads, saved = run(model)
    expected, expected_grads, reference_saved = run(reference)
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)
    # backward keeps the bf16 weights (half the bytes) where the fp32 model keeps fp32 ones, and no fp32 copies
    weights, reference_weights = frozen_weight_bytes(model, saved), frozen_weight_bytes(reference, reference_saved)
    assert reference_weights > 0 and weights == reference_weights // 2
    assert sum(saved.values()) == sum(reference_saved.values()) - reference_weights // 2


def test_merged_export_of_a_bf16_stored_base_is_fp32_and_matches(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.frozen.linear import has_low_precision_frozen, store_frozen_linears
    from lorafit.lora import apply_lora
    from lorafit.models.file_pages import _file_mapped_ranges
    from lorafit.outputs.merged import export_merged

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4, alpha=8, target_layers=TARGETS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    store_frozen_linears(model, torch.bfloat16)
    assert has_low_precision_frozen(model)
    # from_pretrained left the weights in the mapped safetensors file; none stays there (its pages would stay
    # resident next to the bf16 copies)
    ranges = _file_mapped_ranges()
    assert not [n for n, p in model.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    diff = export_merged(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "merged")
    assert diff < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert has_low_precision_frozen(model)  # the trained model itself is left as it was
