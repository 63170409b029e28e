"""`lorafit configs list|cp`: the shipped configs, copied out to start from, never over a user's file."""

from __future__ import annotations

from pathlib import Path

from lorafit.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_list_names_every_shipped_config_with_its_purpose(capsys):
    assert main(["configs", "list"]) == 0
    out = capsys.readouterr().out
    for path in (REPO / "configs").glob("*.yaml"):
        assert f"\n{path.stem} " in f"\n{out}"
    assert "chat_sft" in out and "Starting config: chat fine-tuning" in out


def test_cp_copies_byte_for_byte_into_a_file_or_folder_and_never_overwrites(tmp_path, capsys):
    assert main(["configs", "cp", "qlora.yaml", str(tmp_path)]) == 0
    assert (tmp_path / "qlora.yaml").read_bytes() == (REPO / "configs" / "qlora.yaml").read_bytes()
    mine = tmp_path / "mine.yaml"
    mine.write_text("my own")
    assert main(["configs", "cp", "chat_sft", str(mine)]) == 2
    assert "already exists; lorafit never overwrites it" in capsys.readouterr().err
    assert mine.read_text() == "my own"
    assert main(["configs", "cp", "qlroa", str(tmp_path / "x.yaml")]) == 2
    assert "no shipped config 'qlroa' (did you mean 'qlora'?); valid: " in capsys.readouterr().err
