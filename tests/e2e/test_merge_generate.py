"""`lorafit merge` and `lorafit generate` on a tiny Llama with a trained-looking (non-zero) adapter."""

from __future__ import annotations

import json

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
    captured = capsys.readouterr()
    assert "max |logit diff|" in captured.out
    assert "Writing model shards" not in captured.err and "%|" not in captured.err  # no library bar in logs
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
    code = main(
        ["merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    )
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


PROMPTS = ["The capital of France is", "Hi", "A longer prompt, so that the batch needs left padding here"]


def _generate(capsys, *args: str) -> str:
    assert main(["generate", *args]) == 0
    return capsys.readouterr().out


def test_prompts_file_answers_in_batches_as_one_by_one(tiny_model_dir, adapter_dir, tmp_path, capsys):
    model = ["--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--max_new_tokens", "6"]
    singles = [_generate(capsys, *model, "--prompt", p).rstrip("\n") for p in PROMPTS]
    assert len(set(singles)) > 1  # the prompts give different answers: the comparison below can fail
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    rows = [json.loads(line) for line in _generate(capsys, *model, "--prompts_file", str(prompts)).splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["output"] for r in rows] == singles
    chats = tmp_path / "prompts.jsonl"
    chats.write_text(
        json.dumps({"prompt": PROMPTS[0]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": PROMPTS[1]}]})
        + "\n"
    )
    rows = _generate(capsys, *model, "--chat", "--prompts_file", str(chats), "--batch_size", "1").splitlines()
    assert len(rows) == 2 and json.loads(rows[1])["prompt"] == [{"role": "user", "content": PROMPTS[1]}]


def test_top_k_1_sampling_is_greedy_and_a_seed_repeats(tiny_model_dir, adapter_dir, capsys):
    model = ["--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--prompt", PROMPTS[0]]
    greedy = _generate(capsys, *model, "--max_new_tokens", "8")
    assert _generate(capsys, *model, "--max_new_tokens", "8", "--temperature", "1.5", "--top_k", "1") == greedy
    sampled = [
        _generate(capsys, *model, "--max_new_tokens", "8", "--temperature", "1.5", "--top_p", "0.95", "--seed", "5")
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    assert main(["generate", *model, "--top_p", "0", "--top_k", "-2"]) == 2
    assert "--top_p must be in (0, 1], got 0.0; --top_k must be >= 0, got -2" in capsys.readouterr().err


def test_interactive_chat_on_piped_stdin_keeps_the_conversation(tiny_model_dir, adapter_dir):
    import subprocess
    import sys

    from lorafit.outputs.inference import Sampling, generate_batch, load_with_adapter

    args = ["--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--max_new_tokens", "5"]
    ran = subprocess.run(
        [sys.executable, "-m", "lorafit", "generate", *args, "--interactive"],
        text=True,
        input="Hi\nThe capital of France is\n/reset\nThe capital of France is\n",
        capture_output=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    answers = [line.removeprefix("assistant> ") for line in ran.stdout.splitlines()]
    assert len(answers) == 3 and "(conversation cleared)" in ran.stderr
    model, tokenizer = load_with_adapter(tiny_model_dir, adapter_dir)
    sampling = Sampling(max_new_tokens=5)
    first = [{"role": "user", "content": "Hi"}]
    second = [*first, {"role": "assistant", "content": answers[0]}, {"role": "user", "content": PROMPTS[0]}]
    fresh = [{"role": "user", "content": PROMPTS[0]}]
    # the second answer saw the first exchange; after /reset the same message is answered afresh
    expected = [
        generate_batch(model, tokenizer, [c], chat=True, sampling=sampling)[0].strip() for c in (first, second, fresh)
    ]
    assert answers == expected and expected[1] != expected[2] and all(expected)


def test_the_chat_wrapping_note_is_a_note(tiny_model_dir, adapter_dir, tmp_path, capsys):
    import shutil

    chat_adapter = tmp_path / "chat_adapter"
    shutil.copytree(adapter_dir, chat_adapter)
    (chat_adapter / "lorafit_training.json").write_text(json.dumps({"format": 1, "prompt_format": "chat"}))
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--adapter",
                str(chat_adapter),
                "--prompt",
                "Hi",
                "--max_new_tokens",
                "2",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "note:" in err and "trained on chat-formatted data" in err and "warning" not in err
