"""The Hugging Face model and tokenizer components: what they build, on which device, and their errors."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

import lorafit.models.checkpointed
import lorafit.models.huggingface  # noqa: F401 - registers the components
from lorafit.config.context import build_context
from lorafit.config.graph import ConfigGraph
from lorafit.errors import UserError


def model_entity(variant: str, **config) -> dict:
    return {"m": {"component_key": "model", "variant_key": variant, "config": config}}


def build(config: dict, name: str = "m"):
    return ConfigGraph(config).build(name)


def error_of(config: dict, name: str = "m") -> tuple[str, str]:
    """(YAML path, message) of the one problem that building `name` raises."""
    with pytest.raises(UserError) as info:
        graph = ConfigGraph(config)
        problems = graph.check()
        if problems:
            raise UserError("", problems=problems)
        graph.build(name)
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0].path, info.value.problems[0].message


# ----------------------------------------------------------------------------------- huggingface_from_config
def test_inline_config_builds_the_architecture_it_names():
    overrides = {
        "vocab_size": 128,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "tie_word_embeddings": False,
    }
    model = build(
        model_entity(
            "huggingface_from_config",
            model_type="llama",
            config_overrides=overrides,
            dtype="BF_16",
            attn_implementation="eager",
        )
    )
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(model.model.layers) == 3 and model.lm_head.weight.shape == (128, 16)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied, as configured
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"


def test_config_path_takes_a_folder_or_the_json_file(tiny_model_dir):
    from_folder = build(model_entity("huggingface_from_config", config_path=str(tiny_model_dir)))
    from_file = build(model_entity("huggingface_from_config", config_path=str(tiny_model_dir / "config.json")))
    for model in (from_folder, from_file):
        assert model.config.hidden_size == 32 and model.config._attn_implementation == "sdpa"
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_meta_device_builds_hold_no_memory(tiny_model_dir):
    with build_context(meta_device=True, load_weights=False):
        from_config = build(model_entity("huggingface_from_config", config_path=str(tiny_model_dir)))
        pretrained = build(model_entity("huggingface_pretrained_model", model_name_or_path=str(tiny_model_dir)))
    for model in (from_config, pretrained):
        assert all(p.is_meta for p in model.parameters())
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_validate_does_not_read_the_weights(tmp_path, tiny_model_dir):
    folder = tmp_path / "broken_weights"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with build_context(meta_device=True, load_weights=False):
        assert build(model_entity("huggingface_pretrained_model", model_name_or_path=str(folder))) is not None
    path, message = error_of(model_entity("huggingface_pretrained_model", model_name_or_path=str(folder)))
    assert path == "m.config.model_name_or_path" and f"cannot load the model in {folder}" in message


def test_from_config_errors_name_the_key(tmp_path, tiny_model_dir):
    path, message = error_of(model_entity("huggingface_from_config", model_type="lama"))
    assert path == "m.config.model_type" and "unknown model_type 'lama' (did you mean 'llama'?)" in message
    path, message = error_of(
        model_entity("huggingface_from_config", model_type="llama", config_overrides={"hidden_sise": 8})
    )
    assert path == "m.config.config_overrides.hidden_sise"
    assert "not a LlamaConfig setting (did you mean 'hidden_size'?)" in message
    path, message = error_of(model_entity("huggingface_from_config"))
    assert "exactly one of config_path" in message
    path, message = error_of(
        model_entity("huggingface_from_config", model_type="llama", config_path=str(tiny_model_dir))
    )
    assert "exactly one of config_path" in message
    path, message = error_of(model_entity("huggingface_from_config", config_path=str(tmp_path)))
    assert path == "m.config.config_path" and "config not found" in message
    path, message = error_of(model_entity("huggingface_from_config", config_path=str(tiny_model_dir), dtype="fp8"))
    assert path == "m.config.dtype" and "valid: fp32, bf16, fp16" in message
    path, message = error_of(model_entity("huggingface_from_config", model_type="vit"))
    assert path == "m.config.model_type" and "cannot build a causal LM from a vit config" in message


def test_unknown_attention_implementation_is_reported(tiny_model_dir):
    path, message = error_of(
        model_entity("huggingface_from_config", config_path=str(tiny_model_dir), attn_implementation="warp_speed")
    )
    assert path == "m.config.attn_implementation" and "warp_speed" in message


# ----------------------------------------------------------------------------------- huggingface_pretrained_model
def test_pretrained_folder_dtype_and_attention(tiny_model_dir):
    model = build(
        model_entity(
            "huggingface_pretrained_model",
            model_name_or_path=str(tiny_model_dir),
            dtype="FP16",
            attn_implementation="eager",
        )
    )
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.config._attn_implementation == "eager"


def test_pretrained_path_errors(tmp_path, tiny_model_dir):
    (tmp_path / "no_config").mkdir()
    cases = {
        str(tmp_path / "absent"): "model folder not found",
        str(tmp_path / "no_config"): "has no config.json",
        str(tiny_model_dir / "config.json"): "is a file; give the model's folder",
        # a hub id without network: say what to pass instead
        "HuggingFaceTB/SmolLM2-135M": "not a local folder, and the Hugging Face hub is offline (HF_HUB_OFFLINE=1): "
        "pass a local directory",
    }
    for name, expected in cases.items():
        path, message = error_of(model_entity("huggingface_pretrained_model", model_name_or_path=name))
        assert path == "m.config.model_name_or_path" and expected in message, message


# ----------------------------------------------------------------------------------- tokenizer/huggingface
def tokenizer_entity(path) -> dict:
    return {"t": {"component_key": "tokenizer", "variant_key": "huggingface", "config": {"path": str(path)}}}


def test_tokenizer_component_loads_the_folder(tiny_model_dir, tiny_tokenizer):
    import lorafit.models.tokenizer  # noqa: F401

    tokenizer = build(tokenizer_entity(tiny_model_dir), "t")
    text = "The capital of France is Paris."
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert tokenizer.pad_token == "<|endoftext|>"  # its own pad token is kept
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, tiny_model_dir):
    import lorafit.models.tokenizer  # noqa: F401

    folder = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = build(tokenizer_entity(folder), "t")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_tokenizer_errors_name_the_key(tmp_path):
    import lorafit.models.tokenizer  # noqa: F401

    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    cases = {
        tmp_path / "absent": "tokenizer folder not found",
        tmp_path / "empty": "no tokenizer in",
        tmp_path / "broken": "cannot load the tokenizer in",
    }
    for folder, expected in cases.items():
        path, message = error_of(tokenizer_entity(folder), "t")
        assert path == "t.config.path" and expected in message


# ----------------------------------------------------------------------------------- `lorafit models`
def test_models_command_parses_and_dispatches(tmp_path, monkeypatch, capsys):
    from lorafit.commands import models

    parser = argparse.ArgumentParser(prog="lorafit")
    models.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", "prepare", "smollm2-135m", "--output_dir", str(tmp_path)])
    assert args.func is models.run_prepare and args.output_dir == tmp_path
    assert parser.parse_args(["models", "prepare", "smollm2-135m"]).output_dir.as_posix() == "data/models"
    with pytest.raises(SystemExit):
        parser.parse_args(["models", "prepare", "gpt5"])
    import lorafit.models.smollm2 as smollm2

    calls = []
    monkeypatch.setattr(smollm2, "prepare_smollm2", lambda out, progress: calls.append((out, progress)) or out)
    assert args.func(args) == 0 and calls == [(tmp_path, True)]
