"""Each benchmark script runs end to end on the tiny model with one repetition and writes a sane JSON + PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_benchmark(script: str, model: Path, out: Path, *extra: str) -> dict:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / script),
        "--model",
        str(model),
        "--reps",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = Path(script).stem
    result = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert result["table"] in proc.stdout  # the table printed is the table stored
    return result


def test_inference_benchmark(tiny_model_dir, tmp_path):
    result = run_benchmark("inference.py", tiny_model_dir, tmp_path, "--prompt-tokens", "32", "--new-tokens", "4")
    # the merged model computes what the unmerged adapter computes, and the adapter was not a no-op (B != 0)
    assert result["merged_vs_unmerged_max_abs_logit_diff"] < 1e-4
    for key in ("prefill_merged_over_base", "decode_merged_over_base", "decode_unmerged_over_base"):
        ratio = result["ratios"][key]
        # the structure, not the clock: one repetition, a ratio of two positive times (never a difference)
        assert len(ratio["values"]) == 1 and 0 < ratio["median"] < float("inf")
    assert set(result["prefill_s"]) == {"base", "merged", "unmerged"}


def test_checkpoint_size_benchmark(tiny_model_dir, tmp_path):
    result = run_benchmark("checkpoint_size.py", tiny_model_dir, tmp_path)
    files = result["files_bytes"]
    assert set(files["float32"]["adapter"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert "model.safetensors" in files["float32"]["full"]
    # the adapter tensors are all there: 4 bytes per adapter parameter (plus the safetensors header)
    adapter_tensors = files["float32"]["adapter"]["adapter_model.safetensors"]
    assert result["adapter_parameters"] * 4 < adapter_tensors < result["adapter_parameters"] * 4 + 16_384
    assert files["bfloat16"]["full"]["model.safetensors"] < files["float32"]["full"]["model.safetensors"]
    ratio = result["ratios"]["adapter_float32_over_full_float32"]
    total = sum(files["float32"]["adapter"].values()) / sum(files["float32"]["full"].values())
    assert ratio == pytest.approx(total)


TRAIN_ARGS = ("--steps", "3", "--sequence-length", "32")


def test_vs_trainer_peft_benchmark(tiny_model_dir, tmp_path):
    result = run_benchmark("vs_trainer_peft.py", tiny_model_dir, tmp_path, *TRAIN_ARGS)
    runs = result["runs"]
    assert set(runs) == {"lorafit:fp32", "hf:fp32"}
    ours, theirs = runs["lorafit:fp32"][0], runs["hf:fp32"][0]
    # same job, same initial adapter, same data order, both fp32: the two tools compute the same loss curve
    assert len(ours["losses"]) == len(theirs["losses"]) == 3
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-4)
    assert result["ratios"]["fp32"]["loss_max_rel_diff"] < 1e-4
    assert result["best"] == {"lorafit": "lorafit:fp32", "hf": "hf:fp32"}
    for run in (ours, theirs):  # the child's own memory: at least torch + transformers, less than the machine
        assert 100 * 2**20 < run["peak_rss_bytes"] < 8 * 2**30
        assert run["tokens_per_s"] > 0 and run["step_end_s"] == sorted(run["step_end_s"])
    assert result["job"]["tokens_per_step"] == 2 * 32
    # each tool under its own default allocator: tbbmalloc for lorafit (as `lorafit run`), glibc for the Trainer
    assert (ours["allocator"], theirs["allocator"]) == ("tbbmalloc", "system")


def test_vs_trainer_peft_on_instruction_data_with_swapped_allocators(tiny_model_dir, tmp_path):
    # 256-token blocks hold 2-3 conversations each (32-token ones hold pieces of one), so the documents of a block
    # must be kept apart in both contenders (position ids restarting per document)
    result = run_benchmark(
        "vs_trainer_peft.py",
        tiny_model_dir,
        tmp_path,
        "--steps",
        "3",
        "--sequence-length",
        "256",
        "--data",
        "instruction",
        "--variants",
        "lorafit:fp32+glibc,hf:fp32+tbbmalloc",
    )
    ours, theirs = result["runs"]["lorafit:fp32+glibc"][0], result["runs"]["hf:fp32+tbbmalloc"][0]
    assert (ours["allocator"], theirs["allocator"]) == ("system", "tbbmalloc")
    # prompts masked: the Trainer's loss over all logits and lorafit's over target rows only agree. Tight: the
    # random tiny model barely notices attention across documents (a Trainer given no position ids was 3.4e-5
    # off), and the same job agrees to ~1e-7
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=5e-6, abs=0)
    assert result["data"] == "instruction"


def test_lora_vs_full_benchmark(tiny_model_dir, tmp_path):
    result = run_benchmark("lora_vs_full.py", tiny_model_dir, tmp_path, *TRAIN_ARGS)
    lora, full = result["runs"]["lora"][0], result["runs"]["full"][0]
    # the same model and batch: B = 0 makes step 1 of LoRA the base model's loss, as full fine-tuning's is
    assert lora["losses"][0] == pytest.approx(full["losses"][0], rel=1e-5)
    assert lora["losses"][1:] != pytest.approx(full["losses"][1:], rel=1e-6)  # they train different weights
    ratio = result["ratios"]["step_time"]
    assert ratio["median"] == pytest.approx(lora["step_s"] / full["step_s"])


def test_engine_settings_benchmark(tiny_model_dir, tmp_path):
    # chunks of 32 target positions: the 2 x 32-position micro-batch takes 2 chunks (the chunked path really runs)
    result = run_benchmark(
        "engine_settings.py", tiny_model_dir, tmp_path, *TRAIN_ARGS, "--variants", "chunked", "--chunk-tokens", "32"
    )
    assert result["variants"]["chunked"] == {"loss_chunk_tokens": 32}
    # chunking the output head + cross-entropy changes how the loss is computed, not its value
    assert result["ratios"]["chunked"]["loss_max_rel_diff"] < 1e-5
    assert result["ratios"]["default"]["tokens_per_s"]["median"] == 1.0


def test_step_profile_benchmark(tiny_model_dir, tmp_path):
    result = run_benchmark(
        "step_profile.py", tiny_model_dir, tmp_path, "--sequence-length", "32", "--chunk-tokens", "32"
    )
    assert set(result["step_s"]) == {"baseline", "eager-attn", "chunked-ce", "bf16"}
    phases = result["phases_s"]["baseline"]
    assert sum(p["median"] for p in phases.values()) > 0
    assert sum(result["baseline_phase_share"].values()) == pytest.approx(1.0)
    assert sum(result["operator_share"].values()) == pytest.approx(1.0)
    # the speed-ups must not change what is trained: same losses as the baseline step for step
    diffs = result["loss_max_rel_diff_vs_baseline"]
    assert diffs["chunked-ce"] < 1e-5 and diffs["eager-attn"] < 1e-4 and diffs["bf16"] < 2e-2
    assert "aten::" in result["operator_table"]


def test_matmul_dtypes_benchmark(tiny_model_dir, tmp_path):
    result = run_benchmark("matmul_dtypes.py", tiny_model_dir, tmp_path, "--tokens", "16", "--min-seconds", "0.01")
    assert set(result["shapes"]) == {"q_proj", "k_proj", "gate_proj", "down_proj", "lm_head"}
    assert result["ratios_vs_fp32"]["fp32"]["median"] == 1.0
    for name, values in result["step_mix_gflops"].items():
        assert len(values) == 1 and values[0] > 0, name


def test_variants_benchmark_runs_real_lorafit_runs(tiny_model_dir, tmp_path):
    """PiSSA and the 4-bit base (its adapted layers in bf16) through `lorafit run` (the tiny model stands in for
    SmolLM2): a table row each, a PiSSA adapter converted to rank 2r, and none of torchao's CUDA-library noise in
    the user's log."""
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "variants.py"),
        "--variants",
        "pissa",
        "nf4_attn_bf16",
        "--steps",
        "2",
        "--parallel",
        "2",
        "--model-folder",
        str(tiny_model_dir),
        "--work-dir",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "variants.json").read_text())
    assert set(result["runs"]) == {"pissa_s1", "nf4_attn_bf16_s1"} and result["table"] in proc.stdout
    assert all(r["steps"] == 2 and r["peak_rss_mb"] > 0 and r["n"] == 64 for r in result["runs"].values())
    assert all(r["trainable_params"][0] > 0 for r in result["runs"].values())
    adapter = json.loads((tmp_path / "work" / "runs" / "pissa_s1" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["init_lora_weights"] is True  # r=8 trained, saved converted
    log = (tmp_path / "work" / "nf4_attn_bf16_s1.log").read_text()
    assert "stored as NF4" in log and "Failed to load" not in log and "Enum subclass" not in log
    assert "8 named in nf4_skip_layers kept in bfloat16" in log  # q, k, v, o of the tiny model's 2 blocks

    # forgetting.py on these run folders: the PiSSA adapter (converted to the original base) is judged on the base;
    # the 4-bit run is refused (its adapter belongs to another base)
    runs = tmp_path / "work" / "runs"
    forgetting = [
        sys.executable,
        str(REPO / "benchmarks" / "forgetting.py"),
        "--model-folder",
        str(tiny_model_dir),
        "--max-new-tokens",
        "8",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run([*forgetting, str(runs / "pissa_s1")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = json.loads((tmp_path / "forgetting.json").read_text())["loss_on_base_answers"]
    assert set(losses) == {"base", "pissa_s1"} and all(0 < v < 20 for v in losses.values())
    refused = subprocess.run([*forgetting, str(runs / "nf4_attn_bf16_s1")], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode != 0 and "low-precision base" in refused.stderr


def test_evaluation_speed_benchmark_checks_both_contenders_agree(tiny_model_dir, tmp_path):
    data = tmp_path / "held.jsonl"
    questions = ["What colour is the sky?", "The capital of Spain is", "abc", "Lorem ipsum dolor"]
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "blue"}]}) + "\n"
            for q in questions
        )
    )
    cmd = [sys.executable, str(REPO / "benchmarks" / "evaluation_speed.py"), "--model", str(tiny_model_dir)]
    cmd += ["--reps", "1", "--threads", "1", "--out", str(tmp_path), "--data", str(data), "--max-new-tokens", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "evaluation_speed.json").read_text())
    assert result["table"] in proc.stdout
    assert result["same_answers"] == len(questions) == result["examples"]
    assert result["loss"]["one_prefill"] == pytest.approx(result["loss"]["two_passes"], rel=1e-5)
    assert set(result["seconds"]) == {"two_passes", "one_prefill"}
