"""The documentation cannot drift from the code.

- docs/configs.md is exactly what scripts/gen_config_docs.py renders from the component registry;
- every `lorafit ...` command line in README.md and docs/*.md names real (sub)commands and real options
  of the real argparse parser, and every command is documented somewhere;
- every relative link points to an existing file, and every `#anchor` to a heading of that file;
- the facts the pages spell out (LoRA and parallelism fields, adapter_config.json keys, what may change on
  resume) are the code's, and every YAML snippet parses.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = sorted([REPO / "README.md", *DOCS.glob("*.md")])
FENCE = re.compile(r"^(```+|~~~+)([^\n]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
# `lorafit <words>` in code, not `src/lorafit/...` nor `lorafit.lora`; the script form `lorafit/__main__.py run` too
COMMAND = re.compile(r"(?:(?<![\w./-])lorafit|lorafit/__main__\.py)[ \t]+([^\n]+)")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return [(m.group(2).strip().lower(), m.group(3)) for m in FENCE.finditer(text)]


def without_code(text: str) -> str:
    return INLINE_CODE.sub(" ", FENCE.sub(" ", text))


def command_lines(text: str) -> list[str]:
    """The text after `lorafit` in shell-like code: fenced blocks (program output in `text`/`json` blocks
    excluded, backslash continuations joined) and inline code spans."""
    chunks = [body.replace("\\\n", " ") for lang, body in fenced_blocks(text) if lang not in ("text", "json")]
    chunks += [m.group(2) for m in INLINE_CODE.finditer(FENCE.sub(" ", text))]
    found = []
    for chunk in chunks:
        for match in COMMAND.finditer(chunk.replace("\\|", "|")):
            line = re.split(r"\s#|\s&&\s|;|\s\|\s", match.group(1))[0]
            found.append(" ".join(line.split()))
    return found


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_command(parser: argparse.ArgumentParser, line: str) -> list[str]:
    """Problems with one documented command line: unknown (sub)commands or options."""
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    words = [w.strip("[]") for w in words if w.strip("[]") and w != "--debug"]  # --debug is accepted anywhere
    top = subcommands(parser)
    if words and words[0].startswith("--"):  # a top-level option such as --version
        return [] if words[0] in parser._option_string_actions else [f"`lorafit {line}`: no option {words[0]}"]
    if not words or words[0] not in top:
        return [f"`lorafit {line}`: '{words[0] if words else ''}' is not a command (valid: {', '.join(top)})"]
    path, current = [words[0]], top[words[0]]
    nested = subcommands(current)
    if nested:
        if len(words) < 2 or words[1] not in nested:
            return [
                f"`lorafit {line}`: '{' '.join(words[1:2])}' is not a `lorafit {words[0]}` subcommand "
                f"(valid: {', '.join(nested)})"
            ]
        path.append(words[1])
        current = nested[words[1]]
    options = set(current._option_string_actions)
    return [
        f"`lorafit {line}`: `lorafit {' '.join(path)}` has no option {option}"
        for option in (w.split("=", 1)[0] for w in words if w.startswith("--"))
        if option not in options
    ]


def github_anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation other than '-' and '_' dropped, spaces -> '-'."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


# --- the generated reference --------------------------------------------------------------------------------------
def test_config_reference_is_generated_from_the_registry():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.render()
    assert "### `model` / `lora`" in rendered  # the registry was really loaded
    assert (DOCS / "configs.md").read_text(encoding="utf-8") == rendered, (
        "docs/configs.md is stale: run `python scripts/gen_config_docs.py`"
    )


# --- commands -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    from lorafit.cli import build_parser

    return build_parser()


def test_command_checker_catches_wrong_commands_and_options(parser):
    assert check_command(parser, "data pack --input x.jsonl --tokenizer d --output p") == []
    assert check_command(parser, "run --config_file_path X [--resume_from latest|PATH] --debug") == []
    assert "not a command" in check_command(parser, "train --config_file_path X")[0]
    assert check_command(parser, "--version") == [] and "no option" in check_command(parser, "--versions")[0]
    assert "subcommand" in check_command(parser, "data unpack --input x")[0]
    assert check_command(parser, "merge --base b --adapter a --output-dir o") == []  # kebab-case spelling
    assert check_command(parser, "merge --base b --adapter a --output-folder o") == [
        "`lorafit merge --base b --adapter a --output-folder o`: `lorafit merge` has no option --output-folder"
    ]
    text = "```bash\nlorafit run \\\n    --config_file_path a.yaml  # comment --nope\n```\n```text\nlorafit wrote\n```"
    assert command_lines(text + "\nsee `lorafit validate --config_file_path X` and src/lorafit/cli.py") == [
        "run --config_file_path a.yaml",
        "validate --config_file_path X",
    ]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_documented_commands_exist(parser, page):
    problems = [p for line in command_lines(page.read_text(encoding="utf-8")) for p in check_command(parser, line)]
    assert not problems, "\n".join(problems)


def test_every_command_is_documented(parser):
    from lorafit.cli import COMMANDS

    mentioned = {line.split()[0] for page in PAGES for line in command_lines(page.read_text(encoding="utf-8"))}
    assert set(subcommands(parser)) == set(COMMANDS)
    assert set(COMMANDS) <= mentioned, f"never shown in the docs: {sorted(set(COMMANDS) - mentioned)}"


# --- links --------------------------------------------------------------------------------------------------------
def test_anchor_rules_match_githubs():
    text = "# Merge, unmerge, merge-and-unload: never implicit\n## What `adapter_config.json` contains\n## In vLLM\n"
    assert github_anchors(text) == {
        "merge-unmerge-merge-and-unload-never-implicit",
        "what-adapter_configjson-contains",
        "in-vllm",
    }


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_point_to_existing_files_and_headings(page):
    problems = []
    for target in LINK.findall(without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        file = (page.parent / file_part).resolve() if file_part else page
        if not file.exists():
            problems.append(f"{target}: {rel(file) if file.is_relative_to(REPO) else file} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in github_anchors(file.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading '#{anchor}' in {rel(file)}")
    assert not problems, "\n".join(problems)


def test_index_lists_every_page():
    linked = set(LINK.findall((DOCS / "index.md").read_text(encoding="utf-8")))
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "index.md" and p.name not in linked]
    assert not missing, f"docs/index.md does not link {missing}"


# --- facts the pages spell out ------------------------------------------------------------------------------------
def _table_keys(page: str, heading: str) -> set[str]:
    """First-column `names` of the first table under `heading`."""
    text = (DOCS / page).read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    rows = re.findall(r"^\|[ \t]*`([\w.]+)`[ \t]*\|", section.split("\n\n|", 1)[1].split("\n\n", 1)[0], re.M)
    return set(rows)


def test_lora_fields_documented_are_the_components():
    from lorafit.lora.component import LoraModelConfig

    assert _table_keys("lora.md", "## The `model/lora` component") == set(LoraModelConfig.model_fields)


def test_parallelism_fields_documented_are_the_components():
    from lorafit.distributed.parallel import FSDP2Config

    documented = _table_keys("distributed.md", "Decoder blocks are the modules")
    assert documented == set(FSDP2Config.model_fields)  # fsdp2's fields: every strategy's, and load_after_sharding


def test_adapter_config_example_has_exactly_the_keys_written():
    from lorafit.lora import adapter_config, apply_lora
    from tiny import make_llama

    text = (DOCS / "lora.md").read_text(encoding="utf-8")
    example = next(json.loads(body) for lang, body in fenced_blocks(text) if lang == "json" and "peft_type" in body)
    written = adapter_config(
        apply_lora(make_llama(), r=2, alpha=1, target_layers=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    assert list(example) == list(written)
    assert {k: v for k, v in example.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in written.items() if k != "base_model_name_or_path"
    }


def test_every_may_change_path_is_documented():
    from lorafit.checkpoint.resume import MAY_CHANGE

    text = (DOCS / "checkpoints.md").read_text(encoding="utf-8")
    assert [p for p in MAY_CHANGE if f"`{p}`" not in text] == []


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_yaml_snippets_parse(page):
    for lang, body in fenced_blocks(page.read_text(encoding="utf-8")):
        if lang in ("yaml", "yml"):
            assert isinstance(yaml.safe_load(body), dict), body
