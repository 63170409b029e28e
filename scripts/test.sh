#!/usr/bin/env bash
# The README's test command: install everything into .venv, then run the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,wandb,mlflow,nf4
VENV="${LORAFIT_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/ruff" check src tests benchmarks scripts
"$VENV/bin/python" -m pytest tests "$@"
