"""The GPU benchmark script runs end to end (its --tiny CPU mode: same set-up order, same loop)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_fsdp2_smollm_1p7b.py"


def test_benchmark_script_tiny_mode(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    summary = bench.main(["--tiny", "--activation_checkpointing", "--out", str(out)])
    assert json.loads(out.read_text()) == summary
    assert summary["steps"] == 4 and summary["tokens_per_s"] > 0 and summary["params_lora"] > 0
    assert all(v == v and v < 10 for v in summary["loss_first_last"])  # finite, about ln(512)
    full = bench.SMOLLM_1P7B
    # the real shape: ~1.7B parameters (tied embeddings counted once)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**full)).parameters())
    assert 1.6e9 < n < 1.8e9
