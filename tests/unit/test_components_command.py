"""`lorafit components`: lorafit's own components first, Modalities' after them under their own heading."""

from __future__ import annotations

from lorafit.cli import main


def test_native_components_first_modalities_grouped_by_name_only(capsys):
    assert main(["components"]) == 0
    out = capsys.readouterr().out
    native, modalities = out.split("# Modalities compatibility", 1)
    assert "dataset / jsonl_instruction" in native and "tokenizer / huggingface" in native
    assert "    chat_template: str | null = None" in native  # native components with their fields
    assert "pretrained_hf_tokenizer" not in native and "adam_w" not in native
    assert "tokenizer / pretrained_hf_tokenizer" in modalities and "optimizer / adam_w" in modalities
    assert "\n    " not in modalities.split("\n", 2)[2]  # names only, no fields
    assert main(["components", "--modalities"]) == 0
    assert "    padding: bool | str = False" in capsys.readouterr().out.split("# Modalities compatibility", 1)[1]


def test_one_component_key_shows_both_groups_with_fields(capsys):
    assert main(["components", "sampler"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no native sampler component") and "sampler / distributed_sampler" in out
