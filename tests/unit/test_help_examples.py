"""The override examples that `lorafit run --help` and `lorafit validate --help` print ("e.g. KEY=VALUE") apply to
every shipped native config: the config loads and checks with the override, and the value lands where it says. A
wrong example (such as the Modalities layout's `settings.training.sequence_length` on a native config) fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lorafit.cli import build_parser
from lorafit.run.build import load_run_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _examples() -> list[tuple[str, str]]:
    """(command, KEY=VALUE) for each override example in the commands' help texts."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    found = []
    for name in ("run", "validate"):
        for action in commands[name]._actions:
            found += [(name, example) for example in re.findall(r"e\.g\. (\S+=[^\s;,]+)", action.help or "")]
    return found


def test_the_help_texts_have_examples():
    assert {command for command, _ in _examples()} == {"run", "validate"}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
@pytest.mark.parametrize(("command", "example"), _examples())
def test_help_override_examples_apply_to_every_shipped_config(config, command, example, monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped configs name repository paths
    loaded, _graph = load_run_config(config, overrides=(example,))
    key, value = example.split("=", 1)
    node = loaded
    for part in key.split("."):
        assert isinstance(node, dict) and part in node, f"{command} --help: {key} is not in {config.name}"
        node = node[part]
    assert node == yaml.safe_load(value), (command, example, config.name)
