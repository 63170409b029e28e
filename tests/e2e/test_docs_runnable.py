"""The docs' command blocks marked runnable run, as a user would paste them, so an example can never be wrong.

A ```bash block of README.md or docs/*.md runs when the line before it is

    <!-- runnable -->                      the block as it is
    <!-- runnable: KEY=VALUE ... -->       with these config overrides added to each `... run --config...` line
                                           (a training shrunk to a few steps; shell-quoted as on a command line)

Each block runs in its own folder that looks like a checkout (configs/, src/, scripts/, data/task, data/models ...:
links to this repository's; data/packed and experiments/ are the block's own), with this venv's `lorafit` and
`python` first on PATH and no input (an interactive chat ends at once). Blocks use the real SmolLM2 model.
The help texts' override examples are checked by tests/unit/test_help_examples.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
MARKED = re.compile(r"^<!-- runnable(?::[ \t]*(.*?))?[ \t]*-->\n```bash\n(.*?)^```[ \t]*$", re.S | re.M)
RUN_LINE = re.compile(r"(?:^|\s)run --config")
LINKED = ("configs", "src", "scripts", "benchmarks")


def marked_blocks() -> list[tuple[str, list[str], str]]:
    """(page:line, overrides, the block's text) of every runnable block."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in MARKED.finditer(text):
            where = f"{page.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 2}"
            found.append((where, shlex.split(match.group(1) or ""), match.group(2)))
    return found


def with_overrides(block: str, overrides: list[str]) -> str:
    """The block with `overrides` added to each training command (before a trailing comment)."""
    if not overrides:
        return block
    added = " ".join(shlex.quote(o) for o in overrides)
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        if RUN_LINE.search(line):
            command, hash_, comment = line.partition("  #")
            line = f"{command.rstrip()} {added}" + (f"  {hash_}{comment}" if hash_ else "")
        lines.append(line)
    return "\n".join(lines) + "\n"


BLOCKS = marked_blocks()


def test_every_runnable_marker_sits_on_a_bash_block():
    """A marker that a typo or an edit separated from its block would silently test nothing."""
    markers = sum(  # a marker is a line of its own; the README's sentence about the markers is not one
        len(re.findall(r"^<!-- runnable", page.read_text(encoding="utf-8"), flags=re.MULTILINE)) for page in PAGES
    )
    assert markers == len(BLOCKS) and len(BLOCKS) >= 4


@pytest.mark.slow
@pytest.mark.parametrize(("where", "overrides", "block"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_runnable_block_runs(where, overrides, block, smollm2_dir, tmp_path):
    for name in LINKED:
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "data").mkdir()
    for entry in (REPO / "data").iterdir():
        if entry.name != "packed":  # the block's own tokenized files (`lorafit data pack` never overwrites)
            (tmp_path / "data" / entry.name).symlink_to(entry)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = with_overrides(block, overrides)
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=1200,
    )
    output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{where}: exit {done.returncode}\n{script}\n{output}"
