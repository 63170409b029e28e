#!/usr/bin/env bash
# The reference environment of the `modalities` test tier: the real modalities 0.5.0 from the package index, which
# imports only with transformers < 5 (its config module imports a tokenizer module transformers 5 removed), so it gets
# a venv of its own, outside the repository and kept between runs: ~/.cache/lorafit-ci/modalities-0.5.0 (override
# with LORAFIT_MODALITIES_VENV). torch==2.13.0 first (the CPU build on local disk), as for lorafit's own venv.
# Prints the venv's python. Idempotent: a venv whose marker matches is reused at once.
set -euo pipefail
VENV="${LORAFIT_MODALITIES_VENV:-$HOME/.cache/lorafit-ci/modalities-0.5.0}"
MARKER="$VENV/.lorafit-ready-1"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ ! -f "$MARKER" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q torch==2.13.0 >&2
  "$VENV/bin/python" -m pip install -q "modalities==0.5.0" "transformers>=4.56,<5" >&2
  "$VENV/bin/python" -c "import modalities.registry.components, modalities.__main__" >&2
  touch "$MARKER"
fi
echo "$VENV/bin/python"
