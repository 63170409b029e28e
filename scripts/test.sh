#!/usr/bin/env bash
# The README's test command: install everything into .venv, then run the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,wandb,mlflow,nf4
# the real llama.cpp for the `llamacpp` tier: built once (~4-8 min on 2 cores), then reused from a cache outside the repo
bash scripts/install_llamacpp.sh
# the real modalities 0.5.0 for the `modalities` tier, in a venv of its own (it needs transformers < 5): made once
# (~2-3 min), then reused from ~/.cache/lorafit-ci
bash scripts/install_modalities_env.sh >/dev/null
VENV="${LORAFIT_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/ruff" check src tests benchmarks scripts
# Everything, every group (CI). The groups by cost, to run one at a time (markers in pyproject.toml):
#   fast unit:    pytest tests -m "not (integration or distributed or slow)"   (no training, no lorafit process, no SmolLM2)
#   integration:  pytest tests -m integration   (tests/e2e + marked unit tests: training, subprocesses, benchmarks)
#   distributed:  pytest tests -m distributed   (2 processes with gloo)
#   slow:         pytest tests -m slow          (the real SmolLM2 model)
#   modalities:   pytest tests -m modalities    (lorafit against the real modalities 0.5.0 in its own venv)
#   llamacpp:     pytest tests -m llamacpp      (GGUF files read by the real llama.cpp; fail under CI=true without it)
"$VENV/bin/python" -m pytest tests "$@"
