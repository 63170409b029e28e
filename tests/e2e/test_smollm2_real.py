"""The real embedded model: after `models prepare`, transformers loads the folder and answers correctly, and the
seed's checkpointed path (from-config model + model.bin) computes exactly the folder's logits."""

from __future__ import annotations

import argparse

import pytest
import torch

from tiny_runs import checkpointed_model

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from lorafit.models.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def folder_model(smollm2_dir):
    """Loaded once per module, by transformers itself (nothing of ours in between)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, local_files_only=True).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> torch.Tensor:
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def test_prepared_folder_is_smollm2_135m(smollm2_dir, folder_model, tokenizer, monkeypatch, capsys):
    import lorafit.models.smollm2 as smollm2
    from lorafit.commands.models import run_prepare

    config = folder_model.config
    assert type(folder_model).__name__ == "LlamaForCausalLM"
    shape = (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.vocab_size,
    )
    assert shape == (30, 576, 9, 3, 1536, 49152)
    assert config.tie_word_embeddings and folder_model.lm_head.weight is folder_model.model.embed_tokens.weight
    assert round(sum(p.numel() for p in folder_model.parameters()) / 1e6, 1) == 134.5
    assert not hasattr(config, "quantization_config")
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.model_max_length) == ("<|im_end|>", "<|im_end|>", 8192)
    assert smollm2.find_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"

    # prepared already: the command returns without reading the GGUF again
    monkeypatch.setattr(smollm2, "_read_gguf", lambda *a: pytest.fail("the GGUF was read again"))
    args = argparse.Namespace(output_dir=smollm2_dir.parent, no_progress=False)
    assert run_prepare(args) == 0
    assert "already prepared" in capsys.readouterr().out


def test_greedy_answer_names_paris(folder_model, tokenizer, prompt_ids):
    with torch.no_grad():
        out = folder_model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    answer = tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_model_bin_through_checkpointed_model_gives_the_folder_logits(smollm2_dir, folder_model, prompt_ids):
    import lorafit.models.checkpointed
    import lorafit.models.huggingface  # noqa: F401 - registers the components
    from lorafit.config.graph import ConfigGraph
    from lorafit.models.deferred import deferred_init

    seed = {  # the seed config's model part, as README shows it (device 0 falls back to the CPU here)
        "huggingface_smol_llm_model": {
            "component_key": "model",
            "variant_key": "huggingface_from_config",
            "config": {"config_path": str(smollm2_dir)},
        },
        "checkpointed_model": checkpointed_model(
            "huggingface_smol_llm_model", smollm2_dir.parent / "SmolLM2-135M_saved" / "model.bin", device=0
        ),
    }
    graph = ConfigGraph(seed)
    assert graph.check() == []
    with deferred_init():
        model = graph.build("checkpointed_model").eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(prompt_ids).logits, folder_model(prompt_ids).logits)
