"""benchmarks/fsdp2_meta_memory.py runs end to end on its tiny shape (2 torchrun processes per contender) and
writes a sane JSON + PNG: both paths train the same losses, and the meta build is what the default path says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_fsdp2_meta_memory_benchmark_tiny(smollm2_dir, tmp_path):
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "fsdp2_meta_memory.py"),
        "--shape",
        "tiny",
        "--model",
        str(smollm2_dir),
        "--threads",
        "1",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--workdir",
        str(tmp_path / "work"),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "fsdp2_meta_memory.json").read_text())
    assert (tmp_path / "out" / "fsdp2_meta_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["table"] in proc.stdout
    whole, meta = result["runs"]["whole"], result["runs"]["meta"]
    assert meta["meta_build_said"] and not whole["meta_build_said"]
    assert len(meta["losses"]) == 2 and meta["losses"] == whole["losses"]  # the same weights, the same adapters
    for run in (whole, meta):
        assert len(run["peak_rss_bytes_per_rank"]) == 2 and all(b > 100e6 for b in run["peak_rss_bytes_per_rank"])
    assert not (tmp_path / "work").exists()  # the random model is not left behind
