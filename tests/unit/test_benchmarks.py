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
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--model", str(model), "--reps", "1",
           "--threads", "1", "--out", str(out), *extra]  # fmt: skip
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
        assert len(ratio["values"]) == 1 and 0 < ratio["median"] < 100
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
