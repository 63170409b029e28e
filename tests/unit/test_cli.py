"""Command-line conventions: `--version`, and every `--snake_case` option also spelled `--kebab-case`."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

import pytest

from lorafit.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorafit {importlib.metadata.version('lorafit')}"


@pytest.mark.integration  # a fresh Python process
def test_version_through_the_installed_program():
    out = subprocess.run([sys.executable, "-m", "lorafit", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"lorafit {importlib.metadata.version('lorafit')}"


def test_every_snake_case_option_has_a_kebab_case_spelling_with_the_same_meaning():
    seen = 0
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and "_" in option:
                    assert parser._option_string_actions[option.replace("_", "-")] is action, (path, option)
                    seen += 1
    assert seen >= 10


def test_kebab_and_snake_spellings_parse_alike():
    parser = build_parser()
    snake = parser.parse_args(
        [
            "run",
            "--config_file_path",
            "c.yaml",
            "--experiment_id",
            "x",
            "--resume_from",
            "latest",
            "--allow_config_change",
        ]
    )
    kebab = parser.parse_args(
        [
            "run",
            "--config-file-path",
            "c.yaml",
            "--experiment-id",
            "x",
            "--resume-from",
            "latest",
            "--allow-config-change",
        ]
    )
    short = parser.parse_args(
        ["run", "--config", "c.yaml", "--experiment-id", "x", "--resume-from", "latest", "--allow-config-change"]
    )
    assert vars(snake) == vars(kebab) == vars(short)


def test_help_names_every_spelling_once(capsys):
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    out = capsys.readouterr().out
    assert "--config_file_path, --config, --config-file-path PATH" in out


def test_a_command_without_models_imports_neither_torch_nor_transformers_and_bars_stay_off():
    """`lorafit configs list` starts in a fraction of a second (issue 26 item 5): the progress bars are switched
    off through huggingface_hub, and transformers, imported later in the same process, keeps them off."""
    code = (
        "import sys; from lorafit.cli import main; assert main(['configs', 'list']) == 0; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules)); "
        "from transformers.utils import logging; print(logging.is_progress_bar_enabled())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == ["[]", "False"]


@pytest.mark.parametrize("terminal", [True, False])
def test_library_bars_only_at_a_terminal(terminal, monkeypatch):
    from transformers.utils import logging

    from lorafit.console import hide_library_progress_bars, terminal_progress_bars

    hide_library_progress_bars()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    with terminal_progress_bars():
        assert logging.is_progress_bar_enabled() == terminal
    assert not logging.is_progress_bar_enabled()
