"""LoRA variants side by side on the comparison task, each a real `lorafit run` in its own process.

    python benchmarks/variants.py [--variants lora dora ...] [--seeds 1 2] [--seeded-variants lora dora]
                                  [--steps 30] [--parallel 3] [--threads 1] [--out benchmarks/results]

Every run starts from configs/smollm2_135m_hard_lora.yaml (SmolLM2-135M-Instruct, LoRA r=8 alpha 16 on q,k,v,o,
lr 2e-3, 30 steps of 2 x 128 tokens, data/task_hard) and changes only what the variant names:

    lora        as shipped                       rslora      use_rslora: true (scaling 16/sqrt 8 instead of 16/8)
    dora        use_dora: true                   pissa       init: pissa
    olora       init: olora
    loraplus    loraplus_lr_ratio 16, lr 1e-3    all_linear  target_layers [all-linear]
    nf4         frozen_dtype: nf4 (4-bit base)   bf16base    frozen_dtype: bfloat16
    nf4_attn_bf16  frozen_dtype: nf4 with nf4_skip_layers [q_proj, k_proj, v_proj, o_proj] (the adapted layers bf16)
    nf4_all_linear frozen_dtype: nf4 with target_layers [all-linear] (QLoRA's recipe: an adapter on every 4-bit layer)
    full        no LoRA, every parameter trains, lr 1e-4 (configs/smollm2_135m_full.yaml's)
    full_lr3e-4 the same at lr 3e-4

Reported per run (from the run folder and `os.wait4` on the child): held-out exact match and answer loss after
training (64 held-out examples, unseen names/cities/years/wordings), the mean training step time, the whole
command's peak RSS, the adapter's file size, and the trainable parameters. `--parallel N` runs N children at once
(the machine is shared; say so when quoting step times). Writes <out>/variants.json and prints the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "smollm2_135m_hard_lora.yaml"
sys.path.insert(0, str(REPO / "scripts"))
from quality_lora_vs_full import hardware, read_run  # noqa: E402 - one reader of run folders


def _lora(**changes: Any):
    def apply(config: dict) -> None:
        config["model"]["config"].update(changes)

    return apply


def _loraplus(config: dict) -> None:
    config["optimizer"]["config"].update(lr=1.0e-3, loraplus_lr_ratio=16)


def _full(lr: float):
    def apply(config: dict) -> None:
        config["model"] = {"instance_key": "base_model", "pass_type": "BY_REFERENCE"}
        config["optimizer"]["config"]["lr"] = lr

    return apply


VARIANTS = {
    "lora": _lora(),
    "rslora": _lora(use_rslora=True),
    "dora": _lora(use_dora=True),
    "pissa": _lora(init="pissa"),
    "olora": _lora(init="olora"),
    "loraplus": _loraplus,
    "all_linear": _lora(target_layers=["all-linear"]),
    "nf4": _lora(frozen_dtype="nf4"),
    "nf4_attn_bf16": _lora(frozen_dtype="nf4", nf4_skip_layers=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "nf4_all_linear": _lora(frozen_dtype="nf4", target_layers=["all-linear"]),
    "bf16base": _lora(frozen_dtype="bfloat16"),
    "full": _full(1.0e-4),
    "full_lr3e-4": _full(3.0e-4),
}


def derive(variant: str, seed: int, steps: int, model_folder: str | None) -> dict:
    config = yaml.safe_load(BASE_CONFIG.read_text())
    settings = config["settings"]
    settings["seed"] = seed
    settings["training_target"]["num_target_steps"] = steps
    settings["intervals"].update(
        evaluation_interval_in_steps=steps, checkpointing_interval_in_steps=steps, training_log_interval_in_steps=1
    )
    if model_folder:
        settings["paths"]["model_folder"] = model_folder
    VARIANTS[variant](config)
    return config


def run_one(name: str, config: dict, work: Path, threads: int) -> dict[str, Any]:
    for key, dataset in [("train", config["train_dataset"]), *config["eval_datasets"].items()]:
        dataset["config"]["cache_path"] = str(work / "packed" / f"{name}_{key}")  # runs in parallel never share one
    config_path = work / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        sys.executable,
        "-m",
        "lorafit",
        "run",
        "--config_file_path",
        str(config_path),
        "--experiments_root_path",
        str(work / "runs"),
        "--experiment_id",
        name,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    log_path = work / f"{name}.log"
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (ru_maxrss: KiB on Linux)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"[{name}] lorafit run failed:\n" + log_path.read_text()[-3000:])
    run_dir = work / "runs" / name
    result = read_run(run_dir)
    saved = run_dir / "adapter" / "adapter_model.safetensors"
    saved = saved if saved.exists() else run_dir / "model" / "model.safetensors"
    result.update(
        wall_s=round(time.perf_counter() - start, 1),
        peak_rss_mb=round(usage.ru_maxrss / 1024),
        load_avg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
        step_s=round(result["train_s"] / result["steps"], 2),
        saved_mb=round(saved.stat().st_size / 1e6, 2),
        trainable_params=_trainable(log_path.read_text()),
    )
    for key in ("samples_after", "wrong_after"):
        result.pop(key, None)
    print(
        f"[{name}] {json.dumps({k: result[k] for k in ('accuracy_after', 'heldout_loss_after', 'step_s')})} "
        f"peak {result['peak_rss_mb']} MB, {result['wall_s']:.0f} s",
        flush=True,
    )
    return result


def _trainable(log: str) -> list[int]:
    """(trainable, total) as the run printed them ("trainable params: 921,600 / 135,436,608")."""
    import re

    match = re.search(r"trainable params: ([\d,]+) / ([\d,]+)", log)
    return [int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))] if match else []


def _by_seed(runs: dict[str, dict], variant: str) -> dict[int, dict]:
    """`variant`'s runs by seed (run names are <variant>_s<seed>), in seed order."""
    mine = {int(name.rsplit("_s", 1)[1]): r for name, r in runs.items() if name.rsplit("_s", 1)[0] == variant}
    return dict(sorted(mine.items()))


def _against_lora(mine: dict[int, dict], lora: dict[int, dict]) -> str:
    """The paired difference to plain LoRA over the seeds both ran: seed noise is larger than most gaps, and the
    same seed means the same data order and the same adapter initialisation."""
    shared = [seed for seed in mine if seed in lora]
    if not shared:
        return "-"
    diffs = [mine[s]["correct_after"] - lora[s]["correct_after"] for s in shared]
    lower = sum(mine[s]["heldout_loss_after"] < lora[s]["heldout_loss_after"] for s in shared)
    return f"{sum(diffs) / len(diffs):+.1f} ({', '.join(f'{d:+d}' for d in diffs)}); loss lower {lower}/{len(shared)}"


def table(runs: dict[str, dict], variants: list[str]) -> str:
    header = (
        "| variant | seeds | held-out exact match | vs lora, same seeds: answers, per seed | answer loss "
        "| step time | peak RSS | saved file | trainable params |"
    )
    lines = [header, "|---" * 9 + "|"]
    lora = _by_seed(runs, "lora")
    for variant in variants:
        mine = _by_seed(runs, variant)
        if not mine:
            continue
        rows = list(mine.values())
        accs = ", ".join(f"{r['correct_after']}/{r['n']}" for r in rows)
        mean_acc = sum(r["accuracy_after"] for r in rows) / len(rows)
        paired = _against_lora(mine, lora) if variant != "lora" else "(the reference)"
        losses = ", ".join(f"{r['heldout_loss_after']:.3f}" for r in rows)
        steps = sorted(r["step_s"] for r in rows)
        params = f"{rows[0]['trainable_params'][0]:,}" if rows[0]["trainable_params"] else "?"
        params = "every parameter" if variant.startswith("full") else params  # a full run prints no adapter summary
        peak = max(r["peak_rss_mb"] for r in rows)
        step = steps[len(steps) // 2]
        lines.append(
            f"| {variant} | {len(rows)} | {mean_acc:.1%} ({accs}) | {paired} | {losses} | {step:.2f} s "
            f"| {peak:,} MB | {rows[0]['saved_mb']:g} MB | {params} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1], help="seeds for --seeded-variants")
    parser.add_argument("--seeded-variants", nargs="*", default=[], help="variants run with every seed (else seed 1)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=1, help="children at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--model-folder", help="default: the config's data/models/SmolLM2-135M")
    parser.add_argument("--work-dir", type=Path, default=None, help="run folders (default: a temp folder in /tmp)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to <out>/variants.json's runs (a table measured in parts, e.g. one per lock hold)",
    )
    args = parser.parse_args(argv)
    import tempfile

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lorafit_variants_"))
    work.mkdir(parents=True, exist_ok=True)
    jobs = {}
    for seed in args.seeds:  # every variant's first seed before any second one: a cut-short run covers them all
        for variant in args.variants:
            if seed == args.seeds[0] or variant in args.seeded_variants:
                jobs[f"{variant}_s{seed}"] = derive(variant, seed, args.steps, args.model_folder)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    command = " ".join(["python", "benchmarks/variants.py", *(argv or sys.argv[1:])])
    parts: list[dict] = []
    if args.append and (args.out / "variants.json").exists():
        previous = json.loads((args.out / "variants.json").read_text())
        parts = previous.get("parts") or [
            {k: previous[k] for k in ("date", "command", "load_avg_start", "load_avg_end", "parallel", "threads")}
        ]
        runs.update({name: run for name, run in previous["runs"].items() if name not in jobs})
    done_before = set(runs)
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(run_one, name, config, work, args.threads): name for name, config in jobs.items()}
        for future in concurrent.futures.as_completed(futures):
            runs[futures[future]] = future.result()
            part = {
                "date": started,
                "command": command,
                "load_avg_start": load_start,
                "load_avg_end": os.getloadavg(),
                "parallel": args.parallel,
                "threads": args.threads,
                "runs": [name for name in jobs if name in runs],
            }
            report = {
                **{k: v for k, v in part.items() if k != "runs"},
                "hardware": hardware(),
                "complete": len(runs) == len(jobs) + len(done_before),
                "parts": [*parts, part],
                "runs": {name: runs[name] for name in [*done_before, *jobs] if name in runs},
                "table": table(runs, list(VARIANTS)),
            }
            # written after every run: a run cut short by a time limit still leaves what it measured
            (args.out / "variants.json").write_text(json.dumps(report, indent=1) + "\n")
    print(report["table"])


if __name__ == "__main__":
    main()
