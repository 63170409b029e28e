"""models/shard_loading.py on one process (the sharded case: tests/distributed/test_meta_build_fsdp2.py): a meta-built
model filled from the file equals the loaded model, and a file whose tied tensors differ is refused."""

from __future__ import annotations

import pytest
import torch


def _meta_llama():
    from transformers import LlamaForCausalLM

    from tiny import llama_config

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config())


def _fill(model, path):
    from lorafit.models.shard_loading import defer_weights, file_tensors, load_shards

    defer_weights(model, file_tensors(path), source=str(path))
    model.to_empty(device="cpu")
    return load_shards(model)


def test_meta_model_filled_from_safetensors_equals_the_saved_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = _meta_llama()
    filled = _fill(model, tiny_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one parameter
    assert "model.embed_tokens.weight" in filled
    expected = reference.state_dict()
    for name, param in model.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_tied_tensors_that_differ_in_the_file_are_refused(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorafit.errors import UserError

    state = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict())
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone() + 1
    torch.save(state, tmp_path / "model.bin")
    with pytest.raises(UserError, match="holds different values"):
        _fill(_meta_llama(), tmp_path / "model.bin")


def test_keys_that_do_not_fit_are_named_before_anything_is_read(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorafit.errors import UserError
    from lorafit.models.shard_loading import defer_weights, file_tensors

    state = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict())
    state["extra.weight"] = torch.zeros(2)
    del state["model.norm.weight"]
    torch.save(state, tmp_path / "model.bin")
    with pytest.raises(UserError, match="1 missing .* model.norm.weight.*1 unexpected .* extra.weight"):
        defer_weights(_meta_llama(), file_tensors(tmp_path / "model.bin"), source="model.bin")
