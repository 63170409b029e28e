"""Chat templates a config names (lorafit.data.chat_templates), the default-system-prompt report, and
`lorafit data preview` with the trained tokens marked."""

from __future__ import annotations

import json

import pytest
import yaml

from lorafit.cli import main
from lorafit.data.chat import render_with_mask
from lorafit.data.chat_templates import default_system_prompt, use_template
from lorafit.errors import UserError

CHAT = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]


def _tokenizer(template: str | None = "own"):
    from tiny import make_tokenizer

    tokenizer = make_tokenizer()
    if template != "own":
        tokenizer.chat_template = template
    return tokenizer


def _trained(tokenizer, ids, mask) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])


@pytest.mark.parametrize(
    ("name", "text", "trained"),
    [
        (
            "chatml",
            "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello you<|im_end|>\n",
            "hello you<|im_end|>",
        ),
        ("plain", "### User:\nhi there\n\n### Assistant:\nhello you<|im_end|>\n\n", "hello you<|im_end|>"),
        (
            "llama3",
            "<|im_start|><|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|><|start_header_id|>"
            "assistant<|end_header_id|>\n\nhello you<|eot_id|>",
            "hello you<|eot_id|>",
        ),
    ],
)
def test_builtin_templates_render_and_mask_the_answer(name, text, trained, capsys):
    tokenizer = use_template(_tokenizer(None), name)
    ids, mask = render_with_mask(tokenizer, CHAT, "x")
    assert tokenizer.decode(ids) == text and _trained(tokenizer, ids, mask) == trained
    # llama3's markers are not tokens of the tiny tokenizer: said, not silent
    assert ("are not tokens of this tokenizer" in capsys.readouterr().out) == (name == "llama3")


def test_a_template_file_and_bad_names(tmp_path):
    from lorafit.data.chat_templates import check_template_name

    good = tmp_path / "mine.jinja"
    good.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer = use_template(_tokenizer(None), str(good))
    ids, mask = render_with_mask(tokenizer, CHAT, "x")
    assert _trained(tokenizer, ids, mask) == "hello you<|im_end|>"
    with pytest.raises(
        ValueError,
        match=r"unknown chat template 'chatm' \(did you mean 'chatml'\?\); valid: "
        "tokenizer, chatml, llama3, plain, or the path of a Jinja template file",
    ):
        check_template_name("chatm")
    with pytest.raises(ValueError, match="no such file: templates/none.jinja"):
        check_template_name("templates/none.jinja")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }")
    with pytest.raises(ValueError, match=r"bad.jinja, line 2: not a valid Jinja template"):
        check_template_name(str(bad))


def test_config_errors_name_the_yaml_key(tmp_path, tiny_model_dir):
    from lorafit.run.build import load_run_config
    from tiny_runs import tiny_run_config

    config = tiny_run_config(tiny_model_dir, cache_path=tmp_path / "c")
    config["tokenizer"]["config"]["chat_template"] = "llama-3"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError) as error:
        load_run_config(path)
    assert error.value.render().startswith(
        "tokenizer.config.chat_template: unknown chat template 'llama-3' (did you "
        "mean 'llama3'?); valid: tokenizer, chatml, llama3, plain"
    )


def test_default_system_prompt_is_found_and_reported(tmp_path, tiny_model_dir, capsys):
    injecting = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe nice.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert default_system_prompt(_tokenizer(injecting)) == "Be nice."
    assert default_system_prompt(_tokenizer()) is None  # the tiny template adds none
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": CHAT}, {"messages": [{"role": "system", "content": "Be brief."}, *CHAT]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = tmp_path / "injecting.jinja"
    template.write_text(injecting)
    args = ["data", "pack", "--input", str(data), "--tokenizer", str(tiny_model_dir), "--no_progress"]
    assert main([*args, "--output", str(tmp_path / "a"), "--chat_template", str(template)]) == 0
    out = capsys.readouterr().out
    assert "the chat template adds its default system prompt 'Be nice.' to the 1 conversations without" in out
    assert main([*args, "--output", str(tmp_path / "b"), "--chat_template", "chatml"]) == 0
    assert "default system prompt" not in capsys.readouterr().out


def test_a_tokenizer_without_a_template_trains_conversations_with_a_named_one(tmp_path, tiny_model_dir, capsys):
    import shutil

    folder = tmp_path / "base_model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "response": "4"}) + "\n")
    args = ["data", "pack", "--input", str(data), "--tokenizer", str(folder), "--no_progress"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    assert "name one with the tokenizer's chat_template (chatml, llama3, plain" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "b"), "--chat_template", "plain"]) == 0


def test_preview_marks_trained_tokens_and_reports_packing(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "chats.jsonl"
    rows = [{"prompt": f"question {i}?", "response": f"answer {i}"} for i in range(5)]
    rows.append({"prompt": "a very long question " * 40, "response": "too long"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["data", "preview", "--input", str(data), "--tokenizer", str(tiny_model_dir), "--sequence_length", "64"]
    assert main([*args, "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 documents" in out and "packing: 5 conversations packed whole into" in out
    assert "1 of 6 longer than sequence_length + 1 = 65 tokens were dropped" in out
    sample = out.split("--- sample 0", 1)[1]
    # prompts plain, each answer (with its end token) marked, and each packed conversation after a '|'
    assert "<|im_start|>user\nquestion" in sample and "[[answer" in sample and "<|im_end|>]]" in sample
    assert sample.count(" | ") >= 1 and "[[question" not in sample


def test_preview_of_a_config_dataset(tmp_path, tiny_model_dir, capsys):
    from tiny_runs import tiny_run_config

    config = tiny_run_config(tiny_model_dir, cache_path=tmp_path / "cache" / "lorem", sequence_length=16)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["data", "preview", "--config", str(path), "-n", "2", "settings.step_profile.sequence_length=8"]) == 0
    out = capsys.readouterr().out
    assert "train_dataset: PackedDataset over" in out and "samples of up to 8 tokens" in out
    assert out.count("--- sample") == 2 and "[[" in out
    assert main(["data", "preview", "--config", str(path), "--dataset", "eval_datasets.x"]) == 2
    assert "has no top-level 'eval_datasets'" in capsys.readouterr().err
    # an eval dataset of conversations, one per sample (packing: false), with a named template
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(json.dumps({"prompt": f"q{i} " * (3 + 40 * i), "response": f"a{i}"}) + "\n" for i in range(3))
    )
    config["tokenizer"]["config"]["chat_template"] = "plain"
    config["eval_datasets"] = {
        "chats": {
            "component_key": "dataset",
            "variant_key": "jsonl_instruction",
            "config": {"path": str(chats), "tokenizer": {"instance_key": "tokenizer", "pass_type": "BY_REFERENCE"}},
        }
    }
    path.write_text(yaml.safe_dump(config))
    # the run's one sequence length (a dataset's own may not differ from it): 64 here
    assert (
        main(
            [
                "data",
                "preview",
                "--config",
                str(path),
                "--dataset",
                "eval_datasets.chats",
                "-n",
                "5",
                "settings.step_profile.sequence_length=64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "InstructionDataset" in out and "1 samples of up to 64 tokens; 3 documents" in out
    assert "not packed (packing: false): 2 conversations cut to sequence_length + 1 = 65 tokens, 2 left out" in out
    assert out.count("--- sample") == 1 and "### User:\nq0" in out and "[[a0<|im_end|>]]" in out
    assert (
        main(
            [
                "data",
                "preview",
                "--config",
                str(path),
                "--dataset",
                "eval_datasets.other",
                "settings.step_profile.sequence_length=64",
            ]
        )
        == 2
    )
    assert "eval_datasets has chats" in capsys.readouterr().err
