"""lorafit/atomic.py: a target is either what it was or complete and new; temporaries never outlive a failure."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from cli_run import dead_pid
from lorafit.atomic import atomic_file, atomic_folder, publish_folder, staging_path, write_atomic


def test_write_atomic_replaces_a_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    write_atomic(target, "new")
    write_atomic(tmp_path / "out.bin", b"\x00\x01")
    assert target.read_text() == "new" and (tmp_path / "out.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.json"]


def test_a_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("mine")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "mine" and list(tmp_path.iterdir()) == [target]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "a").write_text("mine")
    with pytest.raises(KeyboardInterrupt), atomic_folder(target) as tmp:
        (tmp / "a").write_text("half")
        raise KeyboardInterrupt
    assert (target / "a").read_text() == "mine" and list(tmp_path.iterdir()) == [target]


def test_a_folder_write_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "nested" / "model"  # the parent is created
    target.mkdir(parents=True)
    (target / "stale").write_text("old")
    with atomic_folder(target) as tmp:
        (tmp / "fresh").write_text("new")
    assert [p.name for p in target.iterdir()] == ["fresh"] and list(target.parent.iterdir()) == [target]


def test_replace_false_never_touches_an_existing_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "theirs").write_text("x")
    with pytest.raises(OSError), atomic_folder(target, replace=False) as tmp:
        (tmp / "mine").write_text("y")
    assert [p.name for p in target.iterdir()] == ["theirs"] and list(tmp_path.iterdir()) == [target]


def test_a_failed_rename_puts_the_old_folder_back(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "a").write_text("mine")
    with pytest.raises(OSError):
        publish_folder(tmp_path / "missing", target)  # the rename fails: there is nothing to publish
    assert (target / "a").read_text() == "mine" and list(tmp_path.iterdir()) == [target]


def test_temporaries_of_dead_processes_are_removed_those_of_live_ones_kept(tmp_path):
    dead = dead_pid()
    host = socket.gethostname()
    target = tmp_path / "out.json"
    abandoned = tmp_path / f".out.json.tmp-{host}-{dead}-abc123"
    live = tmp_path / f".out.json.tmp-{host}-{os.getpid()}-def456"
    other_host = tmp_path / f".out.json.tmp-elsewhere-{dead}-0a1b2c"
    for path in (abandoned, live, other_host):
        path.write_text("x")
    write_atomic(target, "new")
    assert not abandoned.exists() and live.exists() and other_host.exists()
    assert staging_path(target).name.startswith(f".out.json.tmp-{host}-{os.getpid()}-")


def test_a_folder_set_aside_by_a_killed_writer_comes_back(tmp_path):
    """Killed between publish_folder's two renames, a writer leaves the previous folder under `.NAME.old-...` and
    no target: the next write to the target puts it back first (and only then replaces it, if it succeeds)."""
    dead = dead_pid()
    host = socket.gethostname()
    target = tmp_path / "adapter"
    aside = tmp_path / f".adapter.old-{host}-{dead}-abc123"
    aside.mkdir()
    (aside / "weights").write_text("the user's")
    with pytest.raises(RuntimeError), atomic_folder(target):
        raise RuntimeError("this write fails")
    assert (target / "weights").read_text() == "the user's" and not aside.exists()
    aside.mkdir()  # set aside again, but this time a new target was published before the kill
    with atomic_folder(target) as staging:
        (staging / "weights").write_text("new")
    assert (target / "weights").read_text() == "new" and not aside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("lora", [False, True], ids=["plain model", "adapter"])
def test_save_pretrained_replaces_the_folder_whole_or_not_at_all(tmp_path, lora):
    import lorafit
    from lorafit.errors import UserError
    from tiny import make_llama

    class FailingTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{")  # half written, then the disk is full
            raise OSError(28, "No space left on device")

    def model():
        return lorafit.apply_lora(make_llama(), 4, 8, ["q_proj"], warn_save_pretrained=False) if lora else make_llama()

    folder = tmp_path / "model"
    lorafit.save_pretrained(model(), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(OSError, match="No space left"):
        lorafit.save_pretrained(model(), folder, FailingTokenizer(), overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the saved model, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(UserError, match="it is a file"):
        lorafit.save_pretrained(model(), a_file)
    assert a_file.read_text() == "mine"
