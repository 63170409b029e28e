"""The memory allocator of the model-loading commands: oneTBB's scalable allocator (tbbmalloc) or glibc's malloc.

Why tbbmalloc by default: a training step allocates activations in forward and frees them in reverse order in
backward, between temporaries of every size. glibc's heap fragments under that pattern. In SmolLM2-135M LoRA
(2 x 256 tokens) it reached 2.06 GiB of peak RSS where 1.56 GiB was live. With tbbmalloc the peak was 1.51 GiB
at the same step time (docs/benchmarks.md, benchmarks/results); on the shipped main job, 1654 MiB vs 2304 MiB
(0.72x, benchmarks/allocator.py, 2026-12-07). glibc's alternative, a fixed mmap threshold, cost 30% speed.

The choice is a visible setting of the `lorafit` program, not of a config: `--allocator tbbmalloc|system` of
`lorafit run|merge|generate` (in `--help`), else the `LORAFIT_MALLOC` environment variable, else tbbmalloc. A run
records the allocator it ran under in a comment on top of `config.resolved.yaml`; a config's `settings.allocator`
(earlier versions recorded it there) chooses nothing (one that names another allocator is said in the log).

An allocator has to be in place before the process allocates much, so the `lorafit` program (and only it: the
Python API never changes its process's allocator) takes one launcher step right after parsing its arguments
(`launch`, called from cli.main): it re-executes itself once, with tbbmalloc in LD_PRELOAD, before importing torch,
as torch.backends.xeon.run_cpu launches a script under jemalloc or tcmalloc. The process id stays the same, so
torchrun's supervision is not affected. Right after, the re-executed process puts LD_PRELOAD back as the user had
it, so processes it starts (a user's tokenizer script, a compiler) do not inherit tbbmalloc.
An allocator the user already preloads (jemalloc, tcmalloc, tbbmalloc) is left alone. Where the `tbb` wheel is
not installed (it exists for Linux x86-64), nothing changes.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping

ENV = "LORAFIT_MALLOC"  # tbbmalloc (default) | system
CHOICES = ("tbbmalloc", "system")
SCALABLE = ("tbbmalloc", "jemalloc", "tcmalloc")
LIBRARIES = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")  # the proxy needs the allocator first
COMMANDS = ("run", "merge", "generate")  # the commands that load a model
_USER_PRELOAD = "LORAFIT_USER_LD_PRELOAD"  # the user's LD_PRELOAD across the re-exec (unset: there was none)
HELP = (
    "memory allocator: tbbmalloc (default; 0.7x glibc's peak RSS at the same speed in training, "
    "docs/benchmarks.md) or system (glibc's malloc). Also LORAFIT_MALLOC"
)


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


def requested(flag: str | None, environ: Mapping[str, str]) -> str:
    """The allocator asked for: the command's --allocator, else LORAFIT_MALLOC, else tbbmalloc. Never the config:
    a config's `settings.allocator` chooses nothing (config.resolved.yaml records the allocator in a comment)."""
    if flag is not None:
        return flag
    choice = environ.get(ENV)
    if choice is not None and choice not in CHOICES:
        print(f"lorafit: {ENV}={choice!r} is not valid (tbbmalloc or system); using tbbmalloc", file=sys.stderr)
        return "tbbmalloc"
    return choice or "tbbmalloc"


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


def launch(command: str | None, flag: str | None) -> None:
    """The launcher step of the `lorafit` program, after its arguments are parsed: a model-loading `command` that
    wants tbbmalloc (`flag`: its --allocator; else LORAFIT_MALLOC) re-executes once under it (does not return
    then); in the re-executed process, LD_PRELOAD gets back its value from before."""
    if command in COMMANDS:
        environ = preload_environment(os.environ, requested(flag, os.environ))
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
