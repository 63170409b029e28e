"""Model-loading commands re-execute themselves under tbbmalloc, once, unless told not to."""

from __future__ import annotations

import os
import subprocess
import sys

from lorafit.allocator import ENV, LIBRARIES, preload_environment, tbbmalloc_libraries

PROBE = "from lorafit.allocator import active, reexec_under_tbbmalloc as r; print(active(), flush=True); r(['{cmd}'])"


def probe(command: str, **env: str) -> list[str]:
    """What `active()` says in a process before and after `reexec_under_tbbmalloc([command])`, one line each."""
    environ = {k: v for k, v in os.environ.items() if k not in (ENV, "LD_PRELOAD")} | env
    proc = subprocess.run([sys.executable, "-c", PROBE.format(cmd=command)], env=environ, capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    return proc.stdout.split()


def test_the_tbb_wheel_provides_the_allocator():
    libraries = tbbmalloc_libraries()
    assert libraries is not None and [os.path.basename(p) for p in libraries] == list(LIBRARIES)


def test_run_reexecutes_once_under_tbbmalloc():
    # the second process finds tbbmalloc loaded and carries on: exactly one re-exec
    assert probe("run") == ["system", "tbbmalloc"]


def test_commands_that_load_no_model_and_the_opt_out_stay_on_glibc():
    assert probe("validate") == ["system"]
    assert probe("run", LORAFIT_MALLOC="system") == ["system"]


def test_preload_keeps_the_users_own_preload_and_respects_their_allocator():
    env = preload_environment({"LD_PRELOAD": "/opt/libtrace.so"})
    assert env is not None and env["LD_PRELOAD"].split(":") == [*tbbmalloc_libraries(), "/opt/libtrace.so"]
    assert preload_environment({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None
    assert preload_environment({ENV: "system"}) is None
