"""What docs/architecture.md and STYLE.md promise about src/: every file has its line in the layout, no file grows
past 400 lines, and no behaviour hides in a patched forward or in source-text matching."""

import fnmatch
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "lorafit"
DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def _layout_entries() -> list[str]:
    block = DOC.read_text().split("```text", 1)[1].split("```", 1)[0]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def test_every_source_file_has_its_line_in_the_layout():
    entries = _layout_entries()
    files = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)
    missing = [f for f in files if not any(fnmatch.fnmatch(f, e) for e in entries)]
    assert not missing, f"docs/architecture.md has no line for: {missing}"
    stale = [e for e in entries if not any(fnmatch.fnmatch(f, e) for f in files)]
    assert not stale, f"docs/architecture.md names files that do not exist: {stale}"


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_patched_forward_and_no_source_text_matching():
    found = [
        f"{p.relative_to(SRC)}:{i}"
        for p in SRC.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\.forward\s*=(?!=)|getsource", line)
    ]
    assert not found, found
