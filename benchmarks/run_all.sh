#!/usr/bin/env bash
# Every benchmark with the settings whose results are in benchmarks/results/ and docs/benchmarks.md.
# Needs the prepared model (lorafit models prepare smollm2-135m). About 45 minutes on 2 quiet cores.
# Usage: bash benchmarks/run_all.sh [extra args for every script, e.g. --out /tmp/results]
# Training benchmarks run with --threads 2 (all of this machine's cores; pass --threads 1 on a machine other
# people load: two torch threads stall at every barrier for a descheduled thread).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# each tool's default, the allocators swapped, and each tool's speed (compile) and memory (checkpointing) settings
BOTH_BEST=lorafit:fp32,hf:fp32,lorafit:fp32+glibc,hf:fp32+tbbmalloc,lorafit:fp32+compile,hf:fp32+compile
BOTH_BEST=$BOTH_BEST,lorafit:fp32+checkpointing,hf:fp32+checkpointing

$PY benchmarks/checkpoint_size.py --reps 3 --threads 1 "$@"
$PY benchmarks/inference.py --reps 7 --threads 1 "$@"
set -- --threads 2 "$@"
$PY benchmarks/vs_trainer_peft.py --reps 3 --steps 10 --variants lorafit:fp32,hf:fp32 "$@"
# the same job on the main job's conversations (loss on answers only), and each tool's best settings
$PY benchmarks/vs_trainer_peft.py --reps 2 --steps 8 --data instruction \
  --variants "$BOTH_BEST,lorafit:fp32+bf16base,lorafit:fp32+bf16base+checkpointing" \
  --out "${OUT_INSTRUCTION:-benchmarks/results/instruction}" "$@"
$PY benchmarks/vs_trainer_peft.py --reps 2 --steps 8 --variants "$BOTH_BEST" --out "${OUT_BEST:-benchmarks/results/best}" "$@"
# the frozen base stored in bf16 (model/lora frozen_dtype), on the text job
$PY benchmarks/vs_trainer_peft.py --reps 2 --steps 8 --out "${OUT_BF16BASE:-benchmarks/results/bf16base}" \
  --variants lorafit:fp32+bf16base,hf:fp32,lorafit:fp32+bf16base+checkpointing,hf:fp32+checkpointing "$@"
$PY benchmarks/lora_vs_full.py --reps 3 --steps 6 "$@"
$PY benchmarks/engine_settings.py --reps 2 --steps 6 --variants default,glibc,one-chunk,checkpointing,compile,bf16-frozen,malloc128k "$@"
$PY benchmarks/matmul_dtypes.py --reps 3 "$@"
