"""Quantising a memory-mapped model to NF4 keeps one fp32 weight resident at a time, and gives the same NF4 model.

from_pretrained leaves a safetensors file's fp32 weights in a file mapping; `store_nf4_linears` reads each one,
quantises it and hands its pages back (lorafit/frozen/nf4.py). Without that, the pages of every weight read stay
resident until the end: the whole fp32 model in memory next to its NF4 copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lorafit.frozen.nf4 import is_nf4, store_nf4_linears
from lorafit.lora import apply_lora

# a 100 MB model saved and read back; two tests measure RSS in fresh Python processes
pytestmark = pytest.mark.integration

LAYERS, HIDDEN, INTERMEDIATE = 6, 512, 1536
LINEAR_BYTES = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE) * 4  # 78 MiB of fp32 linear weights


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from tiny import make_llama

    path = tmp_path_factory.mktemp("nf4_mapped") / "model"
    shape = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS)
    make_llama(vocab_size=1024, num_attention_heads=8, num_key_value_heads=8, **shape).save_pretrained(path)
    return path


# Peak RSS of quantising (VmHWM, reset through /proc/self/clear_refs after loading), in a fresh process.
CHILD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from lorafit.lora import apply_lora
from lorafit.lora.component import store_frozen_base
from lorafit.frozen.nf4 import _nf4_module
_nf4_module()  # torchao's import, before the baseline
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssFile")}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
apply_lora(model, 4, 8, ["q_proj", "v_proj"], warn_save_pretrained=False)
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from the current RSS
before = status()
attention = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(6) for p in "qkvo"}
done = store_frozen_base(model, "nf4", attention if sys.argv[2] == "attention in bf16" else set())
print(json.dumps({"before": before, "after": status(), "done": done}))
"""


@pytest.mark.parametrize("skip", ["none", "attention in bf16"])
def test_quantising_a_mapped_model_never_holds_its_fp32_linear_weights(saved_model, skip):
    # big temporaries get their own mapping, returned when freed: what is measured is the file's pages, not how
    # glibc's heap happens to fragment
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1", "LORAFIT_MALLOC": "system"}
    cmd = [sys.executable, "-c", CHILD, str(saved_model), skip]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    nf4, bf16 = (LAYERS * 7, 0) if skip == "none" else (LAYERS * 3, LAYERS * 4)
    assert result["done"].startswith(f"frozen weights of {nf4} linear layers stored as NF4")
    assert f"; {bf16} named in nf4_skip_layers kept in bfloat16" in result["done"] or not bf16
    before, after = result["before"], result["after"]
    assert before["RssFile"] < before["VmRSS"] and after["RssFile"] <= before["RssFile"] + (4 << 20)
    # the peak over quantising: the NF4 data (~1/7 of fp32: 11 MiB), one weight's fp32 pages, torchao's 8 MiB
    # temporaries; measured 44 MiB. Were the pages kept, the 78 MiB of fp32 linear weights would come on top.
    # With the attention in bf16 (12 MiB of it) measured 41 MiB. Releasing the file after the bf16 conversion
    # copied the MLP's 54 MiB of fp32 weights out of it before they were quantised: 92 MiB, and this failed
    growth = after["VmHWM"] - before["VmRSS"]
    assert growth < 0.85 * LINEAR_BYTES, f"peak grew by {growth / 2**20:.0f} MiB (fp32 linear weights: 78 MiB)"


def test_the_mapped_model_quantises_to_the_same_nf4_bits(saved_model):
    from transformers import AutoModelForCausalLM

    mapped = AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.float32)
    in_memory = AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.float32)
    with torch.no_grad():
        for parameter in in_memory.parameters():  # memory of its own: nothing of it is a file page to drop
            parameter.data = parameter.data.clone()
    models = [
        apply_lora(m, 4, 8, ["q_proj", "v_proj"], seed=1, warn_save_pretrained=False) for m in (mapped, in_memory)
    ]
    assert [store_nf4_linears(m) for m in models] == [LAYERS * 7] * 2
    ours, reference = (dict(m.named_parameters()) for m in models)
    assert ours.keys() == reference.keys()
    for name, value in ours.items():
        if is_nf4(value):
            parts = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
            for part in parts:
                assert torch.equal(getattr(value, part), getattr(reference[name], part)), f"{name}.{part}"
        else:
            assert not is_nf4(reference[name]) and torch.equal(value, reference[name]), name
    x = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(models[0](x).logits, models[1](x).logits)
