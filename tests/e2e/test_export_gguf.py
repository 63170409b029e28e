"""`lorafit export gguf` on a tiny Llama + adapter: the file read back by transformers' GGUF loader gives the merged
model's logits (exactly in f32, within a stated tolerance in f16 / bf16 / q8_0) and the same token ids."""

from __future__ import annotations

import pytest
import torch

import lorafit
from lorafit.cli import main

TEXTS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Question: what is two plus two?  Answer: 4, 44 or 444?\n\n\tTabs, {braces} and <tags>.",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "unicode: café, naïve, Ljubljana — 東京",
]
# max |logit diff| allowed, as a fraction of max |logit| of the merged model: about 3x what was measured on these
# weights (max |logit| 0.509): f32 0.0, f16 4.5e-4 (8.9e-4 of it), bf16 3.1e-3 (6.1e-3), q8_0 1.0e-2 (2.0e-2).
TOLERANCE = {"f32": 1e-6, "f16": 3e-3, "bf16": 2e-2, "q8_0": 6e-2}
# the tiny tokenizer is new to llama.cpp (its check hash is in no table), so its pre-tokenizer is named: GPT-2's
# byte-level regex, which is what its tokenizer.json splits with
GPT2 = ["--pre-tokenizer", "gpt-2"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # seeded A and B: the differences measured below (TOLERANCE) are for these exact weights
    lorafit.apply_lora(model, r=4, alpha=8, target_layers=["q_proj", "k_proj", "v_proj", "down_proj"], seed=5)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter an effect, on q and k too (the permuted ones)
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    lorafit.save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def merged_logits(tiny_model_dir, adapter_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lorafit.load_adapter(model, adapter_dir)
    merged = lorafit.merge_and_unload(model).eval()
    ids = torch.tensor([[1, 17, 40, 99, 123, 200, 255, 301, 350, 383, 7, 2]])  # fixed ids: no tokenizer involved
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        return ids, merged(ids).logits, base(ids).logits, merged


def read_back(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_read_back_by_transformers_has_the_merged_models_logits(
    tiny_model_dir, adapter_dir, merged_logits, tmp_path, dtype, capsys
):
    import gguf

    out = tmp_path / f"tiny-{dtype}.gguf"
    argv = ["export", "gguf", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--output", str(out)]
    assert main([*argv, "--dtype", dtype, *GPT2]) == 0
    assert "GGUF written to" in capsys.readouterr().out
    ids, expected, base, _ = merged_logits
    with torch.no_grad():
        got = read_back(out)(ids).logits
    diff = (got - expected).abs().max().item()
    assert diff <= TOLERANCE[dtype] * expected.abs().max().item(), diff
    assert (expected - base).abs().max() > 1e-2  # the adapter really changed what was exported

    reader = gguf.GGUFReader(out)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay f32, as in llama.cpp's converter
    assert kinds["blk.0.attn_q.weight"] == dtype.upper()
    assert "output.weight" not in kinds  # tied head: llama.cpp uses token_embd.weight
    if dtype == "q8_0":  # each block of 32 is rounded to steps of 1/127 of its largest |value| (the step stored as
        # f16): at most half a step off, plus 127 times the step's f16 rounding (2^-11 of it)
        tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1, 32)
        exact = merged_logits[3].model.layers[0].mlp.gate_proj.weight.detach().numpy().reshape(-1, 32)
        step = abs(exact).max(axis=1, keepdims=True) / 127
        assert (abs(weights - exact) <= step * (0.5 + 127 * 2**-11) + 1e-7).all()


def test_q_and_k_rows_are_in_llama_cpps_interleaved_rope_order(tiny_model_dir, tmp_path):
    """llama.cpp rotates pairs (2i, 2i+1), Hugging Face rotates halves (i, i + d/2): within each head, the GGUF row
    2i is HF row i and row 2i+1 is HF row i + d/2 (the converter's `permute`)."""
    import gguf
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tiny.gguf"
    assert main(["export", "gguf", "--model", str(tiny_model_dir), "--output", str(out), "--dtype", "f32", *GPT2]) == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(out).tensors}
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for name, hf, heads in [
        ("attn_q", "q_proj", config.num_attention_heads),
        ("attn_k", "k_proj", config.num_key_value_heads),
    ]:
        w = getattr(model.model.layers[1].self_attn, hf).weight.detach()
        g = tensors[f"blk.1.{name}.weight"]
        for h in range(heads):
            for i in range(head_dim // 2):
                assert torch.equal(g[h * head_dim + 2 * i], w[h * head_dim + i])
                assert torch.equal(g[h * head_dim + 2 * i + 1], w[h * head_dim + head_dim // 2 + i])
    assert torch.equal(tensors["blk.1.attn_v.weight"], model.model.layers[1].self_attn.v_proj.weight.detach())


def test_gguf_tokenizer_round_trip(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tiny.gguf"
    assert main(["export", "gguf", "--model", str(tiny_model_dir), "--output", str(out), *GPT2]) == 0
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"], text
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert loaded.chat_template == tiny_tokenizer.chat_template
    messages = [{"role": "user", "content": "Ada, 36, London?"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == tiny_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True
    )


def test_gguf_from_a_run_config(tiny_model_dir, adapter_dir, merged_logits, tmp_path):
    config = tmp_path / "run.yaml"
    (tmp_path / "train.txt").write_text("unused: the export builds only the model and the tokenizer\n")
    config.write_text(
        "train_dataset:\n  component_key: dataset\n  variant_key: text\n"
        f"  config:\n    path: {tmp_path / 'train.txt'}\n"
        "    tokenizer: {instance_key: tokenizer, pass_type: BY_REFERENCE}\n"
        f"tokenizer:\n  component_key: tokenizer\n  variant_key: huggingface\n  config: {{path: {tiny_model_dir}}}\n"
        "model:\n  component_key: model\n  variant_key: huggingface_pretrained_model\n"
        f"  config: {{model_name_or_path: {tiny_model_dir}}}\n"
    )
    out = tmp_path / "from-config.gguf"
    assert (
        main(
            [
                "export",
                "gguf",
                "--model",
                str(config),
                "--adapter",
                str(adapter_dir),
                "--output",
                str(out),
                "--dtype",
                "f32",
                *GPT2,
            ]
        )
        == 0
    )
    ids, expected, _, _ = merged_logits
    with torch.no_grad():
        assert (read_back(out)(ids).logits - expected).abs().max().item() == 0.0


def test_gguf_export_never_overwrites_unasked(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "taken.gguf"
    out.write_bytes(b"mine")
    argv = ["export", "gguf", "--model", str(tiny_model_dir), "--output", str(out), *GPT2]
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert main([*argv, "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]  # no temporary file left behind


def test_gguf_export_refuses_other_architectures_clearly(tmp_path, tiny_tokenizer, capsys):
    from tiny import make_gpt2

    folder = tmp_path / "gpt2"
    make_gpt2(vocab_size=384, n_layer=1).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "gpt2.gguf"
    assert main(["export", "gguf", "--model", str(folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Llama-architecture" in err and "GPT2LMHeadModel" in err and "Traceback" not in err
    assert not out.exists()


def _with_pre_tokenizer(tokenizer, kind: str):
    import copy

    from tokenizers import Regex, pre_tokenizers

    from lorafit.outputs.gguf.vocab import LLAMA3_SPLIT

    tokenizer = copy.deepcopy(tokenizer)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "llama3")
    first = {
        "digits": pre_tokenizers.Digits(individual_digits=True),
        "llama3": pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        "whitespace": pre_tokenizers.Whitespace(),
    }[kind]
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([first, byte_level])
    return tokenizer


@pytest.mark.parametrize(("kind", "name"), [(None, "gpt-2"), ("digits", "smollm"), ("llama3", "llama-bpe")])
def test_a_tokenizer_new_to_llama_cpp_is_refused_with_the_name_that_fits(tiny_tokenizer, kind, name):
    """llama.cpp's converter names the pre-tokenizer only for tokenizers whose check hash it knows; for another one
    the refusal says which llama.cpp pre-tokenizer splits as its tokenizer.json does, and the option that writes it."""
    from lorafit.errors import UserError
    from lorafit.outputs.gguf.vocab import bpe_vocab

    tokenizer = _with_pre_tokenizer(tiny_tokenizer, kind) if kind else tiny_tokenizer
    with pytest.raises(UserError, match="llama.cpp does not know this tokenizer") as refused:
        bpe_vocab(tokenizer, 384)
    assert f"--pre-tokenizer {name} " in str(refused.value)
    assert bpe_vocab(tokenizer, 384, name).pre == name


def test_the_pre_tokenizer_is_found_by_llama_cpps_check_hash(tiny_tokenizer, monkeypatch):
    """The name comes from the table llama.cpp's converter uses, keyed by sha256(str(ids of its check text))."""
    import hashlib

    from lorafit.outputs.gguf import vocab
    from lorafit.outputs.gguf.pre_tokenizers import CHECK_TEXT, HASHES

    ids = tiny_tokenizer.encode(CHECK_TEXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    assert vocab.check_hash(tiny_tokenizer) == digest and digest not in HASHES
    monkeypatch.setitem(HASHES, digest, ("refact", "a tokenizer llama.cpp has checked"))
    assert vocab.bpe_vocab(tiny_tokenizer, 384).pre == "refact"  # the table decides, not tokenizer.json


def test_a_pre_tokenizer_name_llama_cpp_does_not_accept_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    argv = ["export", "gguf", "--model", str(tiny_model_dir), "--output", str(out), "--pre-tokenizer", "gpt2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'gpt2' is not a pre-tokenizer llama.cpp knows" in err and "gpt-2" in err and not out.exists()


def test_llama3_style_tokenizer_round_trips(tiny_model_dir, tiny_tokenizer, tmp_path):
    """transformers' reader applies Llama 3's split regex for `llama-bpe`, as llama.cpp does: same ids."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "llama3-style"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = _with_pre_tokenizer(tiny_tokenizer, "llama3")
    tokenizer.save_pretrained(folder)
    out = tmp_path / "llama3-style.gguf"
    assert main(["export", "gguf", "--model", str(folder), "--output", str(out), "--pre-tokenizer", "llama-bpe"]) == 0
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_unknown_pre_tokenizer_is_refused(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(tiny_model_dir, folder)
    _with_pre_tokenizer(tiny_tokenizer, "whitespace").save_pretrained(folder)
    out = tmp_path / "other.gguf"
    assert main(["export", "gguf", "--model", str(folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "llama.cpp does not know this tokenizer" in err and "matches none lorafit can name" in err
    assert "--pre-tokenizer NAME" in err and not out.exists()


def test_gguf_adapter_refuses_what_llama_cpp_cannot_apply(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lorafit.apply_lora(model, r=4, alpha=8, target_layers=["q_proj"], use_dora=True)
    lorafit.save_adapter(model, tmp_path / "dora")
    out = tmp_path / "dora.gguf"
    argv = ["export", "gguf-adapter", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "dora")]
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "DoRA" in err and "export gguf --adapter" in err and "Traceback" not in err and not out.exists()


def test_gguf_adapter_holds_what_llama_cpps_adapter_loader_reads(tiny_model_dir, adapter_dir, tmp_path):
    """The keys llama.cpp's llama_adapter_lora_init checks, and A / B as PEFT holds them (B's q / k rows permuted);
    llama.cpp itself applies the file in tests/e2e/test_llamacpp.py."""
    import gguf
    from safetensors.torch import load_file

    from lorafit.outputs.gguf.llama import permute_rows

    out = tmp_path / "adapter.gguf"
    argv = ["export", "gguf-adapter", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir)]
    assert main([*argv, "--output", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert (fields["general.type"], fields["general.architecture"], fields["adapter.type"]) == (
        "adapter",
        "llama",
        "lora",
    )
    assert fields["adapter.lora.alpha"] == 8.0
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert len(tensors) == 2 * 4 * 2  # q, k, v, down in 2 layers, A and B each
    peft = load_file(adapter_dir / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1."
    assert torch.equal(tensors["blk.1.attn_q.weight.lora_a"], peft[prefix + "self_attn.q_proj.lora_A.weight"])
    assert torch.equal(
        tensors["blk.1.attn_q.weight.lora_b"], permute_rows(peft[prefix + "self_attn.q_proj.lora_B.weight"], 4)
    )
    assert torch.equal(tensors["blk.1.attn_v.weight.lora_b"], peft[prefix + "self_attn.v_proj.lora_B.weight"])
    assert torch.equal(tensors["blk.1.ffn_down.weight.lora_a"], peft[prefix + "mlp.down_proj.lora_A.weight"])
