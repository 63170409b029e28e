"""Does tbbmalloc still pay? The shipped main job (configs/smollm2_135m_lora.yaml, shortened to --steps) run by
the `lorafit` program under each allocator, each run its own process, alternated (A B, then B A, ...).

    python benchmarks/allocator.py [--steps 20] [--reps 2] [--model data/models/SmolLM2-135M] [--out benchmarks/results]

Per run: the process's peak RSS (`/usr/bin/time`'s maximum resident set; the whole run: loading, evaluators
before and after training, training, the adapter export), the training part's peak RSS (metrics.jsonl's
`peak_rss_mb` at the last step) and the seconds per step after the first logging window (which holds the
warm-up). Reports the medians and the tbbmalloc / system ratios of paired runs. Writes <out>/allocator.json.
Needs `lorafit models prepare smollm2-135m` first; wrap in `flock /tmp/lorafit-heavy.lock` on a shared machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (
    DEFAULT_OUT,
    REPO,
    base_parser,
    fmt_summary,
    hardware,
    markdown_table,
    model_dir,
    ratio_summary,
    summary,
    write_results,
)

CONFIG = REPO / "configs" / "smollm2_135m_lora.yaml"
ALLOCATORS = ("tbbmalloc", "system")


def one_run(allocator: str, steps: int, model: Path, root: Path, name: str) -> dict[str, float]:
    lorafit = Path(sys.executable).with_name("lorafit")
    argv = [
        "/usr/bin/time",
        "-f",
        "maxrss_kib=%M wall_s=%e",
        str(lorafit),
        "run",
        "--config_file_path",
        str(CONFIG),
        "--experiments_root_path",
        str(root),
        "--experiment_id",
        name,
        "--allocator",
        allocator,
        f"settings.training_target.num_target_steps={steps}",
        f"settings.paths.model_folder={model}",
        f"settings.intervals.checkpointing_interval_in_steps={steps}",
        f"settings.intervals.evaluation_interval_in_steps={steps}",
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = dict(re.findall(r"(maxrss_kib|wall_s)=([\d.]+)", done.stderr))
    records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "tokens_per_s" in r and "elapsed_s" in r]
    first, last = train[0], train[-1]
    return {
        "peak_rss_mib": float(found["maxrss_kib"]) / 1024,
        "train_peak_rss_mib": float(last["peak_rss_mb"]),
        "s_per_step": (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"]),
        "wall_s": float(found["wall_s"]),
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], reps=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    model = model_dir(args.model)
    runs: dict[str, list[dict[str, float]]] = {a: [] for a in ALLOCATORS}
    with tempfile.TemporaryDirectory(prefix="lorafit-allocator-") as tmp:
        for rep in range(args.reps):
            for allocator in ALLOCATORS if rep % 2 == 0 else ALLOCATORS[::-1]:
                result = one_run(allocator, args.steps, model, Path(tmp), f"{allocator}-{rep}")
                print(allocator, rep, result, flush=True)
                runs[allocator].append(result)
    keys = ("peak_rss_mib", "train_peak_rss_mib", "s_per_step", "wall_s")
    table = {a: {k: summary([r[k] for r in runs[a]]) for k in keys} for a in ALLOCATORS}
    ratios = {k: ratio_summary([r[k] for r in runs["tbbmalloc"]], [r[k] for r in runs["system"]]) for k in keys}
    rows = [[a, *(fmt_summary(table[a][k], 4 if "rss" in k else 3) for k in keys)] for a in ALLOCATORS]
    rows.append(["tbbmalloc / system", *(fmt_summary(ratios[k]) for k in keys)])
    print(markdown_table(["allocator", "peak RSS MiB (run)", "peak RSS MiB (training)", "s/step", "wall s"], rows))
    result = {"hardware": hardware(), "steps": args.steps, "runs": runs, "summary": table, "ratios": ratios}
    out = write_results(args.out or DEFAULT_OUT, "allocator", result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
