#!/usr/bin/env bash
# Every benchmark with the settings whose results are in benchmarks/results/ and docs/benchmarks.md.
# Needs the prepared model (lorafit models prepare smollm2-135m). About 1-2 hours on 2 busy cores.
# Usage: bash benchmarks/run_all.sh [extra args for every script, e.g. --out /tmp/results]
# The results in the repository were measured with --threads 1 (the default here): on a machine that other
# people load, two torch threads stall at every barrier for a descheduled thread; pass --threads 2 to override.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set -- --threads 1 "$@"

$PY benchmarks/checkpoint_size.py --reps 3 "$@"
$PY benchmarks/inference.py --reps 7 "$@"
$PY benchmarks/vs_trainer_peft.py --reps 3 --steps 10 --variants lorafit:fp32,hf:fp32 "$@"
$PY benchmarks/lora_vs_full.py --reps 3 --steps 6 "$@"
# the best settings of each tool: torch.compile for speed, activation checkpointing for memory
$PY benchmarks/vs_trainer_peft.py --reps 2 --steps 8 --out "${OUT_BEST:-benchmarks/results/best}" \
  --variants lorafit:fp32,hf:fp32,lorafit:fp32+compile,hf:fp32+compile,lorafit:fp32+checkpointing,hf:fp32+checkpointing "$@"
$PY benchmarks/engine_settings.py --reps 2 --steps 6 --variants default,chunked,checkpointing,compile "$@"
$PY benchmarks/step_profile.py --reps 3 --variants baseline,eager-attn,chunked-ce,bf16 "$@"
# glibc's heap: the same jobs with the mmap threshold fixed at 128 KiB / 1 MiB, for both tools
$PY benchmarks/engine_settings.py --reps 2 --steps 6 --out "${OUT_MALLOC:-benchmarks/results/malloc}" \
  --variants malloc128k,malloc1m,compile+malloc1m,checkpointing+malloc128k "$@"
$PY benchmarks/vs_trainer_peft.py --reps 2 --steps 8 --out "${OUT_MALLOC:-benchmarks/results/malloc}" \
  --variants lorafit:fp32+malloc,hf:fp32+malloc,lorafit:fp32+compile+malloc,lorafit:fp32+checkpointing+malloc,hf:fp32+checkpointing+malloc "$@"
