"""The allocator of the model-loading commands: a visible setting of the program (--allocator, LORAFIT_MALLOC; never
the config), tbbmalloc by default via one re-exec, and never handed on to the processes lorafit starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorafit.allocator import ENV, LIBRARIES, preload_environment, requested, tbbmalloc_libraries

# active() before, after the launcher step (command, --allocator), and in a child process the launched process starts
PROBE = """
import subprocess, sys
from lorafit.allocator import active, launch
print(active(), flush=True)
launch({command!r}, {flag!r})
print(active(), flush=True)
child = subprocess.run([sys.executable, "-c", "from lorafit.allocator import active; print(active())"],
                       capture_output=True, text=True, check=True)
print(child.stdout.strip(), flush=True)
"""


def probe(command: str, flag: str | None = None, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k not in (ENV, "LD_PRELOAD")} | env
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(command=command, flag=flag)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stdout.split()


def test_the_tbb_wheel_provides_the_allocator():
    libraries = tbbmalloc_libraries()
    assert libraries is not None and [os.path.basename(p) for p in libraries] == list(LIBRARIES)


@pytest.mark.integration  # fresh Python processes
def test_run_reexecutes_once_under_tbbmalloc_and_children_do_not_inherit_it():
    # glibc before; the re-executed process runs the script from the top under tbbmalloc (launch does not
    # re-execute a second time); a process it starts is on glibc again, since LD_PRELOAD was given back
    assert probe("run") == ["system", "tbbmalloc", "tbbmalloc", "system"]


@pytest.mark.integration  # fresh Python processes
def test_each_way_to_choose_glibc_is_honoured():
    assert probe("run", "system") == ["system", "system", "system"]
    assert probe("run", LORAFIT_MALLOC="system") == ["system", "system", "system"]
    assert probe("validate") == ["system", "system", "system"]  # loads no model: nothing to change


def test_the_order_of_precedence_has_no_config_in_it():
    assert requested("system", {ENV: "tbbmalloc"}) == "system"
    assert requested(None, {ENV: "system"}) == "system"
    assert requested(None, {}) == "tbbmalloc"


def test_the_program_takes_the_launcher_step_after_parsing_and_main_alone_does_not(monkeypatch):
    from lorafit import allocator, cli

    steps = []
    monkeypatch.setattr(allocator, "launch", lambda command, flag: steps.append((command, flag)))
    monkeypatch.setattr(sys, "argv", ["lorafit", "components", "--help"])
    with pytest.raises(SystemExit):  # --help: argparse exits while parsing, before any launcher step
        cli.entry()
    assert cli.main(["components"], launcher=True) == 0 and cli.main(["components"]) == 0
    assert steps == [("components", None)]


def test_a_config_naming_another_allocator_chooses_nothing_and_says_so(capsys):
    from lorafit.run.runner import _check_allocator

    config = {"settings": {"allocator": "tbbmalloc"}}
    _check_allocator(config)  # this test process runs under glibc's malloc
    assert config["settings"]["allocator"] == "tbbmalloc"  # left as the user wrote it; the record is a comment
    said = capsys.readouterr()
    assert "chooses none" in said.err + said.out


def test_the_setting_is_in_the_help_with_its_reason():
    from lorafit.cli import build_parser

    for command in ("run", "merge", "generate"):
        text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
        assert "--allocator {tbbmalloc,system}" in text and "docs/benchmarks.md" in text, command


def test_preload_keeps_the_users_own_preload_and_respects_their_allocator():
    env = preload_environment({"LD_PRELOAD": "/opt/libtrace.so"})
    assert env is not None and env["LD_PRELOAD"].split(":") == [*tbbmalloc_libraries(), "/opt/libtrace.so"]
    assert env["LORAFIT_USER_LD_PRELOAD"] == "/opt/libtrace.so"  # given back after the re-exec
    assert preload_environment({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None
    assert preload_environment({}, "system") is None
