"""`lorafit validate`'s predicted peak memory against the measured peak RSS of the whole `lorafit run` process.

    python benchmarks/memory_prediction.py [--cases main full hard hard_qlora lorem text modalities fsdp2]
                                           [--out benchmarks/results]

Each case is a shipped config (some shortened on the command line: fewer steps, one checkpoint; evaluators kept,
since an evaluator's generation can set the peak), first through `lorafit validate` (its "predicted peak memory
per process" line), then through `lorafit run` in a child process whose peak RSS `os.wait4` reports (ru_maxrss:
the largest of the process and its children, so for torchrun the largest rank). `fsdp2` runs the lorem-ipsum
config under torchrun with 2 processes. Writes <out>/memory_prediction.json and prints a markdown table.
Needs `lorafit models prepare smollm2-135m`; wrap in `flock /tmp/lorafit-heavy.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import torchrun_command

REPO = Path(__file__).resolve().parents[1]
SHORT = [
    "settings.intervals.checkpointing_interval_in_steps=1000",
    "settings.intervals.evaluation_interval_in_steps=1000",
]
CASES: dict[str, tuple[str, list[str], int]] = {  # name -> (config, overrides, processes)
    "main": ("configs/smollm2_135m_lora.yaml", [], 1),
    "full": ("configs/smollm2_135m_full.yaml", ["settings.training_target.num_target_steps=6", *SHORT], 1),
    "hard": ("configs/smollm2_135m_hard_lora.yaml", ["settings.training_target.num_target_steps=10", *SHORT], 1),
    "hard_qlora": ("configs/smollm2_135m_hard_qlora.yaml", ["settings.training_target.num_target_steps=10", *SHORT], 1),
    "lorem": ("configs/config_lorem_ipsum_lora.yaml", [], 1),
    # the text job: LoRA r=8 on q,k,v,o, 2 x 256 tokens, every token a target (plain text)
    "text": (
        "configs/config_lorem_ipsum_lora.yaml",
        ["lora_model.config.r=8", "settings.step_profile.sequence_length=256", *SHORT],
        1,
    ),
    "modalities": (
        "configs/modalities/config_lorem_ipsum_lora.yaml",
        ["evaluation_subscriber.config.mode=DISABLED"],
        1,
    ),
    "fsdp2": ("configs/config_lorem_ipsum_lora.yaml", [], 2),
}
PREDICTED = re.compile(r"predicted peak memory per process: ([\d,]+) MiB \((.*)\)")


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def prediction_of(name: str) -> re.Match:
    """`lorafit validate`'s prediction line for case `name` (seconds: the model is built on the meta device)."""
    config, overrides, processes = CASES[name]
    validate = [sys.executable, "-m", "lorafit", "validate", "--config", config, "--nproc_per_node", str(processes)]
    out = subprocess.run([*validate, *overrides], cwd=REPO, env=ENV, capture_output=True, text=True, check=True).stdout
    return PREDICTED.search(out)


def measure(name: str, work: Path) -> dict:
    config, overrides, processes = CASES[name]
    env = ENV
    match = prediction_of(name)
    run = ["run", "--config", config, "--experiments_root_path", str(work), "--experiment_id", name, *overrides]
    if processes > 1:
        command = torchrun_command(processes, "src/lorafit/__main__.py", *run)
    else:
        command = [sys.executable, "-m", "lorafit", *run]
    start = time.perf_counter()
    with (work / f"{name}.log").open("w") as log:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:  # recorded, and the other cases still run
        error = (work / f"{name}.log").read_text().strip().splitlines()[-1]
        print(f"[{name}] failed: {error}", flush=True)
        return {"config": config, "overrides": overrides, "processes": processes, "failed": error}
    predicted = float(match.group(1).replace(",", ""))
    measured = usage.ru_maxrss / 1024
    result = {
        "config": config,
        "overrides": overrides,
        "processes": processes,
        "predicted_mib": predicted,
        "parts": match.group(2),
        "measured_peak_rss_mib": round(measured),
        "error": round(predicted / measured - 1, 4),
        "wall_s": round(time.perf_counter() - start),
    }
    print(f"[{name}] predicted {predicted:,.0f} MiB, measured {measured:,.0f} MiB ({result['error']:+.1%})", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # main: the quickstart's run as shipped (40 steps); benchmarks/main_job_splits.py test measures it three times
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=[c for c in CASES if c != "main"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--repredict",
        action="store_true",
        help="keep <out>/memory_prediction.json's measurements, recompute the predictions",
    )
    args = parser.parse_args(argv)
    if args.repredict:
        results = json.loads((args.out / "memory_prediction.json").read_text())["results"]
        for name, r in results.items():
            if "failed" in r:
                continue
            match = prediction_of(name)
            r.update(predicted_mib=float(match.group(1).replace(",", "")), parts=match.group(2))
            r["error"] = round(r["predicted_mib"] / r["measured_peak_rss_mib"] - 1, 4)
    else:
        with tempfile.TemporaryDirectory(prefix="memory_prediction_") as tmp:
            results = {name: measure(name, Path(tmp)) for name in args.cases}
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu}, {os.cpu_count()} cores", "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_prediction.json").write_text(json.dumps(report, indent=1) + "\n")
    print("| case | config | processes | predicted (MiB) | measured peak RSS (MiB) | error |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if "failed" in r:
            print(f"| {name} | `{r['config']}` {' '.join(r['overrides'])} | {r['processes']} | failed: {r['failed']} |")
            continue
        print(
            f"| {name} | `{r['config']}` {' '.join(r['overrides'])} | {r['processes']} | {r['predicted_mib']:,.0f} | "
            f"{r['measured_peak_rss_mib']:,} | {r['error']:+.1%} |"
        )


if __name__ == "__main__":
    main()
