"""Importing lorafit changes nothing outside it: no environment variable, no other library's logger, no warnings
filter. What a command needs (torchao's log filter in the `lorafit` program, `datasets` offline while a local file
is read) is scoped to the call that needs it."""

import json
import subprocess
import sys

import pytest

SNAPSHOT = """
import json, logging, os, pkgutil, importlib, warnings
import torch, transformers, datasets, safetensors, pydantic, omegaconf, rich  # what lorafit itself imports
import torch.distributed.checkpoint  # (DCP names its loggers when imported: checkpoint/dcp_metadata.py)

def state():
    loggers = {name: [type(l).__name__, l.level, l.propagate, l.disabled, [type(f).__name__ for f in l.filters],
                      len(l.handlers)]
               for name, l in [("", logging.getLogger()), *logging.root.manager.loggerDict.items()]
               if isinstance(l, logging.Logger) and not name.startswith("lorafit")}
    return {"env": dict(os.environ), "loggers": loggers, "warnings": [repr(f) for f in warnings.filters]}

before = state()
import lorafit
for info in pkgutil.walk_packages(lorafit.__path__, "lorafit."):
    importlib.import_module(info.name)
after = state()
changed = {
    "env": sorted(k for k in {*before["env"], *after["env"]} if before["env"].get(k) != after["env"].get(k)),
    "loggers": sorted(k for k, v in after["loggers"].items()
                      if before["loggers"].get(k, ["Logger", 0, True, False, [], 0]) != v),
    "warnings": [w for w in after["warnings"] if w not in before["warnings"]],
}
print(json.dumps(changed))
"""


@pytest.mark.integration  # a fresh Python process importing every module
def test_importing_every_lorafit_module_changes_no_environment_logger_or_warning_filter():
    proc = subprocess.run([sys.executable, "-c", SNAPSHOT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert changed == {"env": [], "loggers": [], "warnings": []}, changed


@pytest.mark.integration  # a fresh Python process
def test_lorafit_quiets_torchao_only_for_its_own_import():
    """torchao's CUDA-library warnings are filtered while frozen/nf4.py imports it, and the filter is gone after."""
    code = (
        "import logging; from lorafit.frozen.nf4 import _nf4_module; _nf4_module(); "
        "print([f for n in ('torchao', 'torch.utils._pytree') for f in logging.getLogger(n).filters])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr[-2000:]
    assert "Failed to load" not in proc.stderr


def test_reading_a_local_file_with_datasets_leaves_it_as_it_was(tmp_path):
    """load_local puts `datasets` offline for the call only: its flag and the environment are as before after."""
    import os

    import datasets

    from lorafit.data.records import load_local

    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    was_flag, was_env = datasets.config.HF_HUB_OFFLINE, os.environ.get("HF_DATASETS_OFFLINE")
    assert load_local(path, None)["text"] == ["a", "b"]
    assert was_flag == datasets.config.HF_HUB_OFFLINE and os.environ.get("HF_DATASETS_OFFLINE") == was_env
