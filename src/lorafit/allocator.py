"""Model-loading commands run under oneTBB's scalable allocator (tbbmalloc) instead of glibc's malloc.

Why: a training step allocates activations in forward and frees them in reverse order in backward, between
temporaries of every size. glibc's heap fragments under that pattern. In SmolLM2-135M LoRA (2 x 256 tokens) it
reached 2.06 GiB of peak RSS where 1.56 GiB was live. With tbbmalloc the peak was 1.51 GiB at the same step time
(docs/benchmarks.md). glibc's alternative, a fixed mmap threshold, cost 30% speed.

An allocator has to be in place before the process allocates anything. So the `lorafit` program re-executes itself
once, with tbbmalloc in LD_PRELOAD, before importing torch; torch.backends.xeon.run_cpu does the same for
jemalloc and tcmalloc. The process id stays the same, so torchrun's process supervision is not affected.
`LORAFIT_MALLOC=system` keeps glibc's malloc. An allocator the user already preloads (jemalloc, tcmalloc,
tbbmalloc) is left alone. Where the `tbb` wheel is not installed (it exists for Linux x86-64), nothing changes.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping

ENV = "LORAFIT_MALLOC"  # tbbmalloc (default) | system
SCALABLE = ("tbbmalloc", "jemalloc", "tcmalloc")
LIBRARIES = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")  # the proxy needs the allocator first
COMMANDS = ("run", "merge", "generate")  # the commands that load a model


def tbbmalloc_libraries() -> list[str] | None:
    """Paths of tbbmalloc and its malloc-replacing proxy from the installed `tbb` wheel, or None."""
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = {f.name: str(f.locate().resolve()) for f in files if f.name in LIBRARIES}
    paths = [found.get(name) for name in LIBRARIES]
    return paths if all(p and os.path.isfile(p) for p in paths) else None


def preload_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute under tbbmalloc, or None where there is nothing to do."""
    choice = environ.get(ENV, "tbbmalloc")
    if choice not in ("tbbmalloc", "system"):
        print(f"lorafit: {ENV}={choice!r} is not valid (tbbmalloc or system); using tbbmalloc", file=sys.stderr)
    if not sys.platform.startswith("linux") or choice == "system":
        return None
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in SCALABLE):  # ours after the re-exec, or the user's own choice
        return None
    libraries = tbbmalloc_libraries()
    if libraries is None:
        return None
    return {**environ, "LD_PRELOAD": ":".join([*libraries, *([preload] if preload else [])])}


def active() -> str:
    """The allocator this process runs under, read from its own memory map."""
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return "system"
    return next((name for name in SCALABLE if name in text), "system")


def reexec_under_tbbmalloc(argv: list[str]) -> None:
    """Replace this process by itself under tbbmalloc when `argv` is a model-loading command."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        return
    environ = preload_environment(os.environ)
    if environ is None:
        return
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
