"""Using an adapter the wrong way fails loudly (issue 17 items 6 and 7), through the real CLI on a tiny Llama:
a chat-trained adapter generates through the chat template by default, an empty answer is explained, an adapter
is never applied twice to a folder it was merged into, and the run's adapter loads in PEFT's AutoPeftModel from
any working directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

import lorafit
from lorafit.cli import main

CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"Record: {name}, {age}."},
            {"role": "assistant", "content": f"name: {name}; age: {age}"},
        ]
    }
    for name, age in [("Ada", 36), ("Alan", 41), ("Grace", 85), ("Linus", 28), ("Marie", 66), ("Emmy", 53)] * 4
]


def run_config(model: str, data: Path, root: Path, seed: int, chat_template: str | None = None, **export) -> dict:
    tokenizer_ref = {"instance_key": "tokenizer", "pass_type": "BY_REFERENCE"}
    return {
        "settings": {
            "seed": seed,
            "step_profile": {"local_train_micro_batch_size": 2, "sequence_length": 32},
            "training_target": {"num_target_steps": 2},
            "export": export,
        },
        "tokenizer": {
            "component_key": "tokenizer",
            "variant_key": "huggingface",
            "config": {"path": model, "chat_template": chat_template},
        },
        "base_model": {
            "component_key": "model",
            "variant_key": "huggingface_pretrained_model",
            "config": {"model_name_or_path": model},
        },
        "model": {
            "component_key": "model",
            "variant_key": "lora",
            "config": {
                "r": 4,
                "alpha": 8,
                "target_layers": ["q_proj", "v_proj"],
                "model": {"instance_key": "base_model", "pass_type": "BY_REFERENCE"},
            },
        },
        "train_dataset": {
            "component_key": "dataset",
            "variant_key": "jsonl_instruction",
            "config": {"path": str(data), "cache_path": str(root / "cache" / "chat"), "tokenizer": tokenizer_ref},
        },
        "optimizer": {"component_key": "optimizer", "variant_key": "adamw", "config": {"lr": 1e-2}},
    }


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Three `lorafit run`s on chat data, started from the base folder's parent with a RELATIVE model path (as the
    shipped configs do): the default, one with settings.export.base_model_name_or_path, one with the chatml template
    instead of the tokenizer's own."""
    root = tmp_path_factory.mktemp("provenance")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    cwd = os.getcwd()
    os.chdir(tiny_model_dir.parent)
    try:
        dirs = {}
        named = {"base_model_name_or_path": "org/tiny-llama"}
        for seed, name, template, export in [
            (3, "default", None, {}),
            (5, "chatml", "chatml", {}),
            (4, "named", None, named),
        ]:
            config = root / f"{name}.yaml"
            config.write_text(yaml.safe_dump(run_config(tiny_model_dir.name, data, root, seed, template, **export)))
            argv = ["run", "--config_file_path", str(config), "--experiments_root_path", str(root / "runs")]
            assert main([*argv, "--experiment_id", name]) == 0
            dirs[name] = root / "runs" / name
    finally:
        os.chdir(cwd)
    return dirs


def test_run_adapter_records_chat_training_and_an_absolute_base(runs, tiny_model_dir):
    adapter = runs["default"] / "adapter"
    assert json.loads((adapter / "lorafit_training.json").read_text())["prompt_format"] == "chat"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    named = json.loads((runs["named"] / "adapter" / "adapter_config.json").read_text())
    assert named["base_model_name_or_path"] == "org/tiny-llama"  # settings.export.base_model_name_or_path


def test_auto_peft_model_loads_the_run_adapter_from_another_folder(runs, tiny_model_dir, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)  # nowhere near the base folder
    peft_model = AutoPeftModelForCausalLM.from_pretrained(runs["default"] / "adapter").eval()
    ours = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), runs["default"] / "adapter")
    ids = torch.tensor([[1, 20, 40, 60, 80, 2]])
    with torch.no_grad():
        assert (peft_model(ids).logits - ours.eval()(ids).logits).abs().max().item() == 0.0


def test_generate_uses_the_chat_template_for_a_chat_trained_adapter(runs, tiny_model_dir, capsys):
    adapter = runs["default"] / "adapter"
    argv = ["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "Record: Ada, 36."]
    argv += ["--max_new_tokens", "6"]
    assert main(argv) == 0
    default = capsys.readouterr()
    assert "trained on chat-formatted data" in default.err
    assert main([*argv, "--chat"]) == 0
    assert capsys.readouterr().out == default.out
    assert main([*argv, "--no-chat"]) == 0
    raw = capsys.readouterr()
    assert "chat-formatted" not in raw.err


def test_the_adapter_carries_its_chat_template_into_generate_and_merge(
    runs, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """The run saves its tokenizer in adapter/ (chat_template.jinja: the template it trained with, here chatml, not
    the base's own); generate and merge with that adapter render chats with it, and PEFT still loads the folder."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from lorafit.data.chat_templates import CHATML
    from lorafit.outputs.inference import load_with_adapter

    base_template = (tiny_model_dir / "chat_template.jinja").read_text()
    assert base_template != CHATML
    adapter = runs["chatml"] / "adapter"
    assert (adapter / "chat_template.jinja").read_text() == CHATML
    assert (runs["default"] / "adapter" / "chat_template.jinja").read_text() == base_template
    assert load_with_adapter(tiny_model_dir, adapter)[1].chat_template == CHATML
    assert load_with_adapter(tiny_model_dir, runs["default"] / "adapter")[1].chat_template == base_template
    assert load_with_adapter(tiny_model_dir, None)[1].chat_template == base_template

    import lorafit.outputs.inference

    rendered_with = []  # the template each generate call renders its prompt with
    real = lorafit.outputs.inference.generate_batch

    def spy(model, tokenizer, prompts, **kwargs):
        rendered_with.append(tokenizer.chat_template)
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(lorafit.outputs.inference, "generate_batch", spy)
    argv = ["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "Record: Ada, 36."]
    argv += ["--max_new_tokens", "2"]
    capsys.readouterr()
    assert main(argv) == 0
    assert f"chat template: {adapter / 'chat_template.jinja'}, the one the adapter was trained with" in (
        capsys.readouterr().err
    )
    own = tiny_model_dir / "chat_template.jinja"
    assert main([*argv, "--chat_template", str(own)]) == 0  # an explicit template still wins
    assert "the one the adapter was trained with" not in capsys.readouterr().err
    assert rendered_with == [CHATML, base_template]

    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--output_dir", str(merged)]) == 0
    assert (merged / "chat_template.jinja").read_text() == CHATML

    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()  # the tokenizer files are no obstacle
    ours = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    ids = torch.tensor([[1, 20, 40, 60, 80, 2]])
    with torch.no_grad():
        assert (peft_model(ids).logits - ours(ids).logits).abs().max().item() == 0.0


def test_an_empty_answer_is_explained(tiny_model_dir, tmp_path, capsys):
    """A model whose every next token is the special <|endoftext|> prints an empty line: say why."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0: greedy picks id 0, <|endoftext|>, skipped when decoding
    model.save_pretrained(tmp_path / "mute")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "mute")
    assert main(["generate", "--model", str(tmp_path / "mute"), "--prompt", "hello", "--max_new_tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == ""
    assert "generated no text" in out.err and "try --chat" in out.err


def test_an_adapter_is_never_applied_to_a_folder_it_was_merged_into(runs, tiny_model_dir, tmp_path, capsys):
    adapter = runs["default"] / "adapter"
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--output_dir", str(merged)]) == 0
    record = json.loads((merged / "lorafit_merge.json").read_text())
    assert record["adapter"] == str(adapter.resolve()) and len(record["adapter_sha256"]) == 64
    capsys.readouterr()
    twice = ["--adapter", str(adapter)]
    assert main(["generate", "--model", str(merged), *twice, "--prompt", "hi", "--max_new_tokens", "2"]) == 2
    assert "already merged into" in capsys.readouterr().err
    out = tmp_path / "twice.gguf"
    assert main(["export", "gguf", "--model", str(merged), *twice, "--output", str(out)]) == 2
    assert "already merged into" in capsys.readouterr().err and not out.exists()
    # another adapter on the merged model is a legitimate stack
    other = runs["named"] / "adapter"
    assert (
        main(["generate", "--model", str(merged), "--adapter", str(other), "--prompt", "hi", "--max_new_tokens", "2"])
        == 0
    )


def test_save_pretrained_writes_what_loads_back(tiny_model_dir, tmp_path):
    """`model.save_pretrained` of a LoRA model loses the adapter on reload (transformers drops the LoRA keys);
    `lorafit.save_pretrained` writes a PEFT adapter that PEFT loads with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.warns(UserWarning, match=r"save_pretrained\(\) would not save .* use lorafit\.save_pretrained"):
        lorafit.apply_lora(model, r=4, alpha=8, target_layers=["q_proj", "v_proj"], seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ids = torch.tensor([[1, 20, 40, 60, 80, 2]])
    with torch.no_grad():
        expected = model.eval()(ids).logits

    model.save_pretrained(tmp_path / "plain")  # the trap this function exists for
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert torch.equal(reloaded, base) and not torch.allclose(reloaded, expected)

    lorafit.save_pretrained(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(ids).logits, expected, atol=1e-6, rtol=1e-6)


def test_transformers_own_peft_integration_loads_the_run_adapter(runs, tiny_model_dir, tmp_path, monkeypatch):
    """transformers loads the run's adapter with the installed transformers and peft, both ways: from_pretrained of
    the adapter folder, and `model.load_adapter` (same logits as lorafit's, exactly). Its adapter helpers
    (set_adapter, active_adapters, add_adapter) check peft against transformers' minimum: transformers 5.24 and 5.25
    ask for peft >= 0.22, which the package index does not have (newest 0.21.2); with such a pair they refuse, as
    docs/merging_and_serving.md says, and this test checks that they do (the test extra pins transformers < 5.24)."""
    from importlib.metadata import version

    from packaging.version import Version
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from transformers.integrations.peft import MIN_PEFT_VERSION

    monkeypatch.chdir(tmp_path)
    adapter = runs["default"] / "adapter"
    loaded = AutoModelForCausalLM.from_pretrained(adapter).eval()
    by_method = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    by_method.load_adapter(str(adapter))
    ours = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    ids = torch.tensor([[1, 20, 40, 60, 80, 2]])
    with torch.no_grad():
        expected = ours(ids).logits
        assert (loaded(ids).logits - expected).abs().max().item() == 0.0
        assert (by_method.eval()(ids).logits - expected).abs().max().item() == 0.0
    if Version(version("peft")) < Version(MIN_PEFT_VERSION):  # e.g. transformers 5.25 with peft 0.21.2
        with pytest.raises(ValueError, match=f"PEFT you are using is not compatible.*>= {MIN_PEFT_VERSION}"):
            loaded.set_adapter("default")
        return
    loaded.set_adapter("default")  # these check peft's version
    assert loaded.active_adapters() == ["default"]
    loaded.add_adapter(LoraConfig(r=2, target_modules=["k_proj"]), adapter_name="second")
