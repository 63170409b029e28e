"""The real modalities 0.5.0 for the `modalities` tier: its venv (made once by scripts/install_modalities_env.sh,
outside the repository) and one request to tests/modalities_ref/reference.py, run there as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "tests" / "modalities_ref" / "reference.py"


def modalities_venv_python() -> str:
    """The python of Modalities' own venv; made when missing. Under CI it must be there (a failure, not a skip)."""
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "install_modalities_env.sh")], capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        message = f"modalities 0.5.0's venv could not be made:\n{done.stderr[-3000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message + "\nrun: bash scripts/install_modalities_env.sh")
    return done.stdout.strip().splitlines()[-1]


def reference(python: str, request: dict) -> dict:
    """The answer of Modalities' own code to `request` (the ops: tests/modalities_ref/reference.py)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [python, str(REFERENCE)], input=json.dumps(request), capture_output=True, text=True, timeout=900, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
