"""The memory allocator of the model-loading commands: oneTBB's scalable allocator (tbbmalloc) or glibc's malloc.

Why tbbmalloc by default: a training step allocates activations in forward and frees them in reverse order in
backward, between temporaries of every size. glibc's heap fragments under that pattern. In SmolLM2-135M LoRA
(2 x 256 tokens) it reached 2.06 GiB of peak RSS where 1.56 GiB was live. With tbbmalloc the peak was 1.51 GiB
at the same step time (docs/benchmarks.md, benchmarks/results). glibc's alternative, a fixed mmap threshold, cost
30% speed.

The choice is a visible setting: `--allocator tbbmalloc|system` of `lorafit run|merge|generate` (in `--help`),
else the `LORAFIT_MALLOC` environment variable, else `settings.allocator` of a run's YAML, else tbbmalloc. The
run writes the allocator it ran under into `config.resolved.yaml` (`settings.allocator`).

An allocator has to be in place before the process allocates anything, so the `lorafit` program (and only it:
the Python API never changes its process's allocator) re-executes itself once, with tbbmalloc in LD_PRELOAD,
before importing torch; torch.backends.xeon.run_cpu does the same for jemalloc and tcmalloc. The process id stays
the same, so torchrun's supervision is not affected. Right after, the re-executed process puts LD_PRELOAD back
as the user had it, so processes it starts (a user's tokenizer script, a compiler) do not inherit tbbmalloc.
An allocator the user already preloads (jemalloc, tcmalloc, tbbmalloc) is left alone. Where the `tbb` wheel is
not installed (it exists for Linux x86-64), nothing changes.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping
from pathlib import Path

ENV = "LORAFIT_MALLOC"  # tbbmalloc (default) | system
CHOICES = ("tbbmalloc", "system")
SCALABLE = ("tbbmalloc", "jemalloc", "tcmalloc")
LIBRARIES = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")  # the proxy needs the allocator first
COMMANDS = ("run", "merge", "generate")  # the commands that load a model
_USER_PRELOAD = "LORAFIT_USER_LD_PRELOAD"  # the user's LD_PRELOAD across the re-exec (unset: there was none)
HELP = ("memory allocator: tbbmalloc (default; 0.7x glibc's peak RSS at the same speed in training, "
        "docs/benchmarks.md) or system (glibc's malloc). Also LORAFIT_MALLOC; a run's settings.allocator")  # fmt: skip


def add_argument(parser) -> None:
    """`--allocator` for a model-loading command's parser."""
    parser.add_argument("--allocator", choices=CHOICES, default=None, help=HELP)


def tbbmalloc_libraries() -> list[str] | None:
    """Paths of tbbmalloc and its malloc-replacing proxy from the installed `tbb` wheel, or None."""
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = {f.name: str(f.locate().resolve()) for f in files if f.name in LIBRARIES}
    paths = [found.get(name) for name in LIBRARIES]
    return paths if all(p and os.path.isfile(p) for p in paths) else None


def requested(argv: list[str], environ: Mapping[str, str]) -> str:
    """The allocator asked for: --allocator, else LORAFIT_MALLOC, else the config's settings.allocator, else
    tbbmalloc."""
    for i, arg in enumerate(argv):
        if arg == "--allocator" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--allocator="):
            return arg.split("=", 1)[1]
    choice = environ.get(ENV)
    if choice is not None:
        if choice not in CHOICES:
            print(f"lorafit: {ENV}={choice!r} is not valid (tbbmalloc or system); using tbbmalloc", file=sys.stderr)
            return "tbbmalloc"
        return choice
    return _from_config(argv) or "tbbmalloc"


def _from_config(argv: list[str]) -> str | None:
    """`settings.allocator` of the run's config file when it is written out literally (no `${...}`)."""
    spellings = ("--config_file_path", "--config-file-path", "--config")
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in spellings), None)
    if path is None:
        path = next((a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in spellings and "=" in a), None)
    if path is None:
        return None
    try:
        import yaml

        settings = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("settings") or {}
    except Exception:  # an unreadable config is reported by the command itself, with its path
        return None
    value = settings.get("allocator") if isinstance(settings, dict) else None
    return value if value in CHOICES else None


def preload_environment(environ: Mapping[str, str], choice: str = "tbbmalloc") -> dict[str, str] | None:
    """The environment to re-execute under tbbmalloc, or None where there is nothing to do."""
    if not sys.platform.startswith("linux") or choice == "system":
        return None
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in SCALABLE):  # ours after the re-exec, or the user's own choice
        return None
    libraries = tbbmalloc_libraries()
    if libraries is None:
        return None
    extra = {_USER_PRELOAD: preload} if "LD_PRELOAD" in environ else {}
    return {**environ, **extra, "LD_PRELOAD": ":".join([*libraries, *([preload] if preload else [])])}


def active() -> str:
    """The allocator this process runs under, read from its own memory map."""
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return "system"
    return next((name for name in SCALABLE if name in text), "system")


def prepare_process(argv: list[str]) -> None:
    """For the `lorafit` program: re-execute under tbbmalloc when `argv` is a model-loading command that wants it
    (does not return then); in the re-executed process, give LD_PRELOAD back its value from before."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS:
        environ = preload_environment(os.environ, requested(argv, os.environ))
        if environ is not None:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    if _is_ours(os.environ):
        _restore_user_preload(os.environ)


def _is_ours(environ: Mapping[str, str]) -> bool:
    libraries = tbbmalloc_libraries() or []
    return bool(libraries) and environ.get("LD_PRELOAD", "").split(":")[: len(libraries)] == libraries


def _restore_user_preload(environ) -> None:
    """LD_PRELOAD as the user had it: the allocator stays loaded in this process, child processes do not get it."""
    if _USER_PRELOAD in environ:
        environ["LD_PRELOAD"] = environ.pop(_USER_PRELOAD)
    else:
        environ.pop("LD_PRELOAD", None)
