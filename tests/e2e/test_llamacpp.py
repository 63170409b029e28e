"""The real llama.cpp reads what `lorafit export gguf` and `export gguf-adapter` write, on a tiny Llama + adapter:
its logits equal the merged model's (f32 to float rounding; f16 and q8_0 within stated tolerances), its tokenizer
splits text as the Hugging Face one does, and the base file + the GGUF adapter equal the merged model."""

from __future__ import annotations

import pytest
import torch

import lorafit
from llamacpp import load, logits, require_llama_cpp, tokenize
from lorafit.cli import main

pytestmark = pytest.mark.llamacpp

TEXTS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Question: what is two plus two?  Answer: 4, 44 or 444?\n\n\tTabs, {braces} and <tags>.",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "unicode: café, naïve, Ljubljana — 東京",
]
IDS = [1, 17, 40, 99, 123, 200, 255, 301, 350, 383, 7, 2]  # fixed ids: no tokenizer involved
# max |logit diff| allowed, as a fraction of the merged model's max |logit| (0.39), with llama.cpp's KV cache in f32:
# about 3x what was measured on these weights with llama-cpp-python 0.3.36 on CPU (f32 3.1e-7, f16 1.4e-3, q8_0
# 2.7e-2; the adapter itself changes the logits by 2.0x max |logit|)
TOLERANCE = {"f32": 1e-6, "f16": 4e-3, "q8_0": 8e-2}


@pytest.fixture(scope="module", autouse=True)
def _llama_cpp():
    require_llama_cpp()


def _adapter(base_dir, path, **lora):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lorafit.apply_lora(
        model, r=4, alpha=8, target_layers=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], seed=5, **lora
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter an effect, on q and k too (the permuted ones)
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    lorafit.save_adapter(model, path)
    return path


def _merged_logits(base_dir, adapter_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lorafit.load_adapter(model, adapter_dir)
    merged = lorafit.merge_and_unload(model).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        ids = torch.tensor([IDS])
        return merged(ids).logits[0].numpy(), base(ids).logits[0].numpy()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return _adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def merged(tiny_model_dir, adapter_dir):
    return _merged_logits(tiny_model_dir, adapter_dir)


def _export(tmp_path, model_dir, dtype, adapter=None, *extra):
    out = tmp_path / f"tiny-{dtype}.gguf"
    argv = ["export", "gguf", "--model", str(model_dir), "--output", str(out), "--dtype", dtype]
    # the tiny tokenizer is new to llama.cpp (its hash is in no table): its pre-tokenizer is GPT-2's byte-level regex
    argv += ["--pre-tokenizer", "gpt-2", *extra]
    assert main([*argv, *(["--adapter", str(adapter)] if adapter else [])]) == 0
    return out


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_runs_the_exported_model_with_the_merged_models_logits(
    tiny_model_dir, adapter_dir, merged, tmp_path, dtype
):
    expected, base = merged
    with load(_export(tmp_path, tiny_model_dir, dtype, adapter_dir), f32_cache=True) as llm:
        got = logits(llm, IDS)
    scale = abs(expected).max()
    diff = abs(got - expected).max()
    assert diff <= TOLERANCE[dtype] * scale, (dtype, diff, scale)
    assert abs(expected - base).max() > 20 * TOLERANCE[dtype] * scale  # the adapter's change is far above the noise


def test_llama_cpp_tokenizes_as_the_hugging_face_tokenizer(tiny_model_dir, tiny_tokenizer, tmp_path):
    with load(_export(tmp_path, tiny_model_dir, "f32")) as llm:
        for text in TEXTS:
            assert tokenize(llm, text) == tiny_tokenizer(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_gguf_adapter_over_the_base_gguf_equals_the_merged_model(tiny_model_dir, tmp_path, rslora):
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", use_rslora=rslora)
    expected, base = _merged_logits(tiny_model_dir, adapter)
    base_gguf = _export(tmp_path, tiny_model_dir, "f32")
    adapter_gguf = tmp_path / "adapter.gguf"
    argv = ["export", "gguf-adapter", "--model", str(tiny_model_dir), "--adapter", str(adapter)]
    assert main([*argv, "--output", str(adapter_gguf)]) == 0
    scale = abs(expected).max()
    with load(base_gguf, f32_cache=True) as llm:  # the base alone
        assert abs(logits(llm, IDS) - base).max() <= TOLERANCE["f32"] * scale
    with load(base_gguf, lora=adapter_gguf, f32_cache=True) as llm:
        got = logits(llm, IDS)
    assert abs(got - expected).max() <= TOLERANCE["f32"] * scale, abs(got - expected).max()
    assert abs(expected - base).max() > 100 * TOLERANCE["f32"] * scale
