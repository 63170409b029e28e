"""`lorafit merge` and `lorafit generate` on a tiny Llama with a trained-looking (non-zero) adapter."""

from __future__ import annotations

import pytest
import torch

import lorafit
from lorafit.cli import main


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lorafit.apply_lora(model, r=4, alpha=8, target_layers=["q_proj", "v_proj", "down_proj"])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter an effect to merge
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    lorafit.save_adapter(model, path)
    return path


def adapter_model(tiny_model_dir, adapter_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lorafit.load_adapter(model, adapter_dir)
    return model.eval()


def test_merge_writes_a_plain_hf_folder_with_the_adapter_models_logits(tiny_model_dir, adapter_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter_dir), "--output_dir", str(out)]) == 0
    assert "max |logit diff|" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() and AutoTokenizer.from_pretrained(out).chat_template

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_modules())
    ids = torch.tensor([[1, 20, 40, 60, 80, 100, 2]])
    with torch.no_grad():
        expected = adapter_model(tiny_model_dir, adapter_dir)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the adapter really changed the model


def test_merge_never_overwrites(tiny_model_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter_dir), "--output_dir", str(out)])
    assert code == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_merge_rejects_a_folder_without_adapter_config(tiny_model_dir, tmp_path, capsys):
    code = main(["merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path), "--output_dir",
                 str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "adapter_config.json" in capsys.readouterr().err


def test_generate_with_adapter_equals_generate_with_merged_model(tiny_model_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter_dir), "--output_dir", str(out)]) == 0
    capsys.readouterr()
    args = ["--prompt", "The capital of France is", "--max_new_tokens", "8"]
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), *args]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", "--model", str(out), *args]) == 0
    assert capsys.readouterr().out == with_adapter
    assert main(["generate", "--model", str(out), "--chat", *args]) == 0
    assert capsys.readouterr().out.strip() != ""
