"""What docs/architecture.md and STYLE.md promise about src/: every file has its line in the layout, the formatter
lays out every file and none grows past 450 formatted lines, no behaviour hides in a patched forward or in
source-text matching, Modalities is translated at the border (no core file imports it or asks whether a config is
one), and no import cycle joins two files."""

import ast
import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "lorafit"
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


def test_the_formatter_lays_out_every_file():
    """`ruff format` decides the layout (hand-packed lines under `# fmt: skip` once dodged a line cap); the escapes
    left are `# fmt: off` blocks of tables (copied data, a corpus of cases), at most 15, each with its reason in
    the comment lines right after it."""
    folders = ["src", "tests", "benchmarks", "scripts"]
    ruff = Path(sys.executable).with_name("ruff")
    checked = subprocess.run([str(ruff), "format", "--check", *folders], cwd=ROOT, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    escapes = []
    for path in (p for folder in folders for p in (ROOT / folder).rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.search(r"#\s*fmt:\s*(skip|off)\s*$", line):
                reason = lines[i + 1].strip() if i + 1 < len(lines) else ""
                escapes.append((f"{path.relative_to(ROOT)}:{i + 1}", reason.startswith("#") and len(reason) > 10))
    assert len(escapes) <= 15, escapes
    assert all(has_reason for _, has_reason in escapes), [where for where, has_reason in escapes if not has_reason]


def test_no_source_file_over_450_formatted_lines():
    """Small modules: counted after the formatter (above), so packing lines cannot make a file look smaller."""
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_no_source_text_matching():
    """Classes are matched by type, never by their source text (a patched forward is checked on the built run:
    tests/unit/test_no_patched_forward.py)."""
    found = [
        f"{p.relative_to(SRC)}:{i}"
        for p in SRC.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"getsource", line)
    ]
    assert not found, found


# ------------------------------------------------------------------------------------------------ imports, read
def _module_of(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_of(p): p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(lorafit module, line, inside a function) of every import in `path`: top-level, function-local and under
    TYPE_CHECKING alike. `from a.b import c` names the module a.b.c when c is one, else a.b."""
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            for name in names:
                while name.startswith("lorafit") and name not in MODULES:
                    name = name.rpartition(".")[0]
                if name.startswith("lorafit") and name != module:
                    found.append((name, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return found


# ------------------------------------------------------------------------------------------------ Modalities
# the component table, `lorafit data` (Modalities' data tools), `lorafit export` (`export modalities`)
MODALITIES_ENTRY_POINTS = {"lorafit.components", "lorafit.commands.data", "lorafit.commands.export"}


def test_only_the_component_table_and_lorafit_data_import_modalities():
    """Modalities is one translator at the edge (config/layouts.py): the core neither imports it nor branches on
    it; what Modalities means differently reaches the core as typed settings (BuiltRun, RunOutline)."""
    found = [
        f"{MODULES[m].relative_to(SRC)}:{line} imports {name}"
        for m in MODULES
        if not m.startswith("lorafit.modalities") and m not in MODALITIES_ENTRY_POINTS
        for name, line, _ in _imports(MODULES[m])
        if name.startswith("lorafit.modalities")
    ]
    assert not found, found


def test_no_core_file_asks_whether_a_config_is_a_modalities_config():
    """Neither by a helper (is_modalities_config) nor by looking for Modalities' own entities in the config."""
    asks = re.compile(r"is_modalities|[\"']train_dataloader[\"']|[\"']wrapped_model[\"']|[\"']app_state[\"']")
    found = [
        f"{p.relative_to(SRC)}:{i}"
        for m, p in MODULES.items()
        if not m.startswith("lorafit.modalities") and m not in MODALITIES_ENTRY_POINTS
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if asks.search(line)
    ]
    assert not found, found


# ------------------------------------------------------------------------------------------------ import cycles
def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_files():
    """Every import counts, function-local and TYPE_CHECKING ones too: a local import hides a cycle, it does not
    remove it. A package's __init__ counts as a file (importing `lorafit.lora` runs lora/__init__.py)."""
    edges = {m: {name for name, _, _ in _imports(p)} for m, p in MODULES.items()}
    assert not _cycles(edges), _cycles(edges)


def test_models_and_frozen_storage_do_not_import_what_builds_on_them():
    """models/ and frozen/ sit below training/, distributed/ and lora/: what they need from above is declared
    below and implemented above (models/wrappers.HoldsModel, a loss module holding the model)."""
    above = ("lorafit.training", "lorafit.distributed", "lorafit.lora", "lorafit.run.build", "lorafit.run.runner")
    found = [
        f"{MODULES[m].relative_to(SRC)}:{line} imports {name}"
        for m in MODULES
        if m.startswith(("lorafit.models", "lorafit.frozen"))
        for name, line, _ in _imports(MODULES[m])
        if name.startswith(above)
    ]
    assert not found, found


# ------------------------------------------------------------------------------------------------ local imports
# The thin entry points keep `lorafit --help` fast by importing late: the program and its commands, the Python API
# (lorafit.train, the lazy LoRA names). Anywhere else a function-local import of a lorafit module hides a
# dependency and needs its reason on the line (`# deferred: ...`).
ENTRY_POINTS = ("lorafit", "lorafit.__main__", "lorafit.cli", "lorafit.api", "lorafit.commands")
# files other branches edit in this round (GGUF export, generate, resume): their local imports get reasons there
NOT_YET: set[str] = set()


def test_function_local_imports_of_lorafit_modules_say_why():
    found = []
    for m, path in MODULES.items():
        if m in ENTRY_POINTS or m.startswith("lorafit.commands.") or m in NOT_YET:
            continue
        lines = path.read_text().splitlines()
        found += [
            f"{path.relative_to(SRC)}:{line}"
            for _, line, local in _imports(path)
            if local and "# deferred:" not in lines[line - 1]
        ]
    assert not found, found


@pytest.mark.integration  # a fresh Python process
def test_lorafit_help_imports_no_torch():
    """The program's entry point stays light: argument parsing and --help never import torch or transformers."""
    import subprocess
    import sys

    code = "import sys, lorafit.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
