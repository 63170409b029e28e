"""`lorafit ARGS` as one torchrun rank that writes its own peak memory to $LORAFIT_PEAK_RSS_DIR/rank<RANK>.json.

Run by benchmarks/fsdp2_meta_memory.py as torchrun's script. It calls `lorafit.cli.main` (the `lorafit` program
without its allocator re-exec: both contenders run under the same, system, allocator).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def peak_memory() -> dict[str, int]:
    """This process's peak resident set: getrusage's ru_maxrss (KiB on Linux) and /proc/self/status VmHWM."""
    record = {"ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            record["vm_hwm_bytes"] = int(line.split()[1]) * 1024
    return record


def main() -> int:
    from lorafit.cli import main as lorafit_main

    code = 1
    try:
        code = lorafit_main(sys.argv[1:])
    finally:
        folder = Path(os.environ["LORAFIT_PEAK_RSS_DIR"])
        rank = os.environ.get("RANK", "0")
        (folder / f"rank{rank}.json").write_text(json.dumps({"rank": int(rank), "exit": code, **peak_memory()}))
    return code


if __name__ == "__main__":
    sys.exit(main())
