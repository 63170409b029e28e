"""The real SmolLM2-135M + an adapter, exported and run in the real llama.cpp, as docs/merging_and_serving.md shows:
the merged f32 and f16 files give `lorafit generate`'s greedy tokens on chat prompts, q8_0 loads and decodes, and the
base file + the GGUF adapter give the same tokens as the merged model. SmolLM2's tokenizer is where the pre-tokenizer
name matters: llama.cpp splits digits one by one for `smollm`, and its tokens must be the Hugging Face tokenizer's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorafit
from llamacpp import greedy, load, require_llama_cpp, tokenize
from lorafit.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

PROMPTS = [
    "What is the capital of France?",
    "Record for this sentence: Ada Lovelace, 36, is a mathematician from London.",
    "Write the numbers 1234 and 56789 in words.",
    "Name three colours.",
    "What is 12 times 12?",
]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module", autouse=True)
def _llama_cpp():
    require_llama_cpp()


@pytest.fixture(scope="module")
def adapter(smollm2_dir, tmp_path_factory):
    """A seeded adapter on q, k, v, o (q and k: the rows llama.cpp permutes) that changes some greedy answers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    lorafit.apply_lora(model, r=8, alpha=16, target_layers=["q_proj", "k_proj", "v_proj", "o_proj"], seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return lorafit.save_adapter(model, tmp_path_factory.mktemp("smollm2-adapter") / "adapter")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def merged_dir(smollm2_dir, adapter, tmp_path_factory):
    """The merged model, as `lorafit merge` writes it."""
    out = tmp_path_factory.mktemp("merged") / "merged"
    assert main(["merge", "--base", str(smollm2_dir), "--adapter", str(adapter), "--output_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def expected(smollm2_dir, merged_dir, tokenizer):
    """Greedy tokens of the merged model (and of the base), as `lorafit generate --chat` computes them."""
    from lorafit.outputs.inference import load_with_adapter

    def answers(folder):
        model, _ = load_with_adapter(folder, None, "fp32", flag="--model")
        out = []
        for prompt in PROMPTS:
            ids = torch.tensor([_prompt_ids(tokenizer, prompt)])
            with torch.no_grad():
                new = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=MAX_NEW_TOKENS,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = new[0, ids.shape[1] :].tolist()
            out.append(new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new)
        return out

    merged, base = answers(merged_dir), answers(smollm2_dir)
    assert merged != base  # the adapter changes answers: a file that dropped it would fail below
    return merged


def _export(tmp_path: Path, argv: list[str]) -> Path:
    assert main(argv) == 0
    return Path(argv[argv.index("--output") + 1])


@pytest.fixture(scope="module")
def merged_f32(smollm2_dir, adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "task-f32.gguf"
    # the command docs/merging_and_serving.md shows
    argv = ["export", "gguf", "--model", str(smollm2_dir), "--adapter", str(adapter), "--output", str(out)]
    return _export(out.parent, [*argv, "--dtype", "f32"])


def _greedy_all(path: Path, tokenizer, lora: Path | None = None) -> list[list[int]]:
    with load(path, lora=lora, n_ctx=256) as llm:
        return [greedy(llm, _prompt_ids(tokenizer, p), MAX_NEW_TOKENS, tokenizer.eos_token_id) for p in PROMPTS]


def test_smollm2_f32_in_llama_cpp_gives_lorafit_generates_tokens(merged_f32, merged_dir, tokenizer, expected, capsys):
    import gguf

    pre = gguf.GGUFReader(merged_f32).fields["tokenizer.ggml.pre"].contents()
    assert pre == "smollm"  # what llama.cpp's own converter writes for this tokenizer
    with load(merged_f32, n_ctx=256) as llm:  # llama.cpp's tokenizer splits the templated prompts as HF's does
        for prompt in PROMPTS:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            assert tokenize(llm, text) == _prompt_ids(tokenizer, prompt), prompt
    got = _greedy_all(merged_f32, tokenizer)
    assert got == expected
    # and the text `lorafit generate` prints is the text of llama.cpp's tokens
    capsys.readouterr()
    for prompt, tokens in zip(PROMPTS[:2], got[:2], strict=True):
        argv = ["generate", "--model", str(merged_dir), "--prompt", prompt, "--chat"]
        assert main([*argv, "--max_new_tokens", str(MAX_NEW_TOKENS)]) == 0
        printed = capsys.readouterr().out
        assert printed.rstrip("\n") == tokenizer.decode(tokens, skip_special_tokens=True)


def test_smollm2_f16_in_llama_cpp_gives_the_same_tokens(smollm2_dir, adapter, tokenizer, expected, tmp_path):
    out = tmp_path / "task-f16.gguf"
    argv = ["export", "gguf", "--model", str(smollm2_dir), "--adapter", str(adapter), "--output", str(out)]
    assert _greedy_all(_export(tmp_path, [*argv, "--dtype", "f16"]), tokenizer) == expected


# llama.cpp's q8_0 decode crashed on an AVX512/AMX Xeon, also for its own converter's file (FACTS.md): the decode runs
# in a child process, so that a crash is reported as llama.cpp's and does not take the test session with it
Q8_0_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[3])
from llamacpp import greedy, load
with load(sys.argv[1], n_ctx=256) as llm:
    print("loaded", flush=True)
    ids = json.loads(sys.argv[2])
    print(json.dumps([greedy(llm, p, 24, int(sys.argv[4])) for p in ids]))
"""


def _has_amx() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "amx_" in cpuinfo.read_text()


def test_smollm2_q8_0_loads_and_decodes_in_llama_cpp(smollm2_dir, adapter, tokenizer, expected, tmp_path):
    out = tmp_path / "task-q8_0.gguf"
    argv = ["export", "gguf", "--model", str(smollm2_dir), "--adapter", str(adapter), "--output", str(out)]
    _export(tmp_path, [*argv, "--dtype", "q8_0"])
    prompts = json.dumps([_prompt_ids(tokenizer, p) for p in PROMPTS])
    support = str(Path(__file__).resolve().parents[1] / "support")
    child = subprocess.run(
        [sys.executable, "-c", Q8_0_CHILD, str(out), prompts, support, str(tokenizer.eos_token_id)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.stdout.startswith("loaded"), f"llama.cpp could not load the q8_0 file: {child.stderr[-2000:]}"
    if child.returncode < 0 and _has_amx():  # killed by a signal: the crash FACTS.md records, llama.cpp's own
        pytest.xfail(
            f"llama.cpp's q8_0 decode crashed (signal {-child.returncode}) on this AMX CPU (FACTS.md: "
            "also for the file llama.cpp's own converter writes); the file loaded"
        )
    assert child.returncode == 0, f"llama.cpp's q8_0 decode failed (rc {child.returncode}): {child.stderr[-2000:]}"
    got = json.loads(child.stdout.strip().splitlines()[-1])
    # 8-bit weights: the answers may part from the f32 ones after a while, but they start the same
    assert all(g[:4] == e[:4] for g, e in zip(got, expected, strict=True)), (got, expected)


def test_base_gguf_plus_gguf_adapter_gives_the_merged_models_tokens(
    smollm2_dir, adapter, tokenizer, expected, tmp_path
):
    # the commands docs/merging_and_serving.md shows: the base alone, then the adapter alone
    base = _export(
        tmp_path,
        ["export", "gguf", "--model", str(smollm2_dir), "--output", str(tmp_path / "base.gguf"), "--dtype", "f32"],
    )
    lora = _export(
        tmp_path,
        [
            "export",
            "gguf-adapter",
            "--model",
            str(smollm2_dir),
            "--adapter",
            str(adapter),
            "--output",
            str(tmp_path / "task-adapter.gguf"),
        ],
    )
    assert lora.stat().st_size < 10e6  # q, k, v, o at r = 8 over 30 layers: ~5 MB in f32, the base 538 MB
    assert _greedy_all(base, tokenizer, lora=lora) == expected
