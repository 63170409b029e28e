"""Quality of LoRA vs full fine-tuning on the shipped task, under the same budget, through `lorafit run`.

    python scripts/quality_lora_vs_full.py [--steps 40] [--full-lr 1e-4 [3e-4 ...]] [--work-dir DIR] [--keep-runs]

Two (or more) runs of SmolLM2-135M-Instruct, each `lorafit run` in its own process, in turn:
- lora_r8: configs/smollm2_135m_lora.yaml with LoRA r=8, alpha 16 on q,k,v,o (its lr, 2e-3);
- full:    configs/smollm2_135m_full.yaml, every parameter trained (its lr, 1e-4; more with --full-lr).
Everything else comes from the shipped configs and is checked to be identical (seed, data and its order, steps,
batch, sequence length, schedule, clipping, evaluators); only `model` and the learning rate differ. Checkpoints
are written once, at the end (a full-model checkpoint is ~1.6 GB; the shipped configs also write one halfway).

It reports, from each run's eval_before.json / eval_after.json / metrics.jsonl: held-out exact match and
held-out answer loss before and after, the training loss, training time, the whole command's wall time and peak
RSS (os.wait4 of the child). Writes benchmarks/results/quality_lora_vs_full.json, each run's small files under
benchmarks/results/quality_lora_vs_full/<name>/, and the results section of docs/quality.md (between the
markers; the rest of the document is kept). Needs `lorafit models prepare smollm2-135m` first.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
LORA_CONFIG = "configs/smollm2_135m_lora.yaml"
FULL_CONFIG = "configs/smollm2_135m_full.yaml"
RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "quality.md"
BEGIN, END = "<!-- results:begin (written by scripts/quality_lora_vs_full.py) -->", "<!-- results:end -->"
KEPT_FILES = ["config.resolved.yaml", "metrics.jsonl", "eval_before.json", "eval_after.json", "report.md"]


# --- the configs -------------------------------------------------------------------------------------------------
def derive_configs(steps: int, full_lrs: list[float] | None = None, r: int = 8, alpha: float = 16) -> dict[str, dict]:
    """{name: config}: the shipped LoRA config at rank `r`, and the shipped full config at each of `full_lrs`."""
    lora = yaml.safe_load((REPO / LORA_CONFIG).read_text())
    full = yaml.safe_load((REPO / FULL_CONFIG).read_text())
    for config in (lora, full):
        settings = config["settings"]
        settings["training_target"]["num_target_steps"] = steps
        settings["intervals"]["checkpointing_interval_in_steps"] = steps  # one checkpoint, after training
        settings["intervals"]["evaluation_interval_in_steps"] = max(1, steps // 2)
        settings["intervals"]["training_log_interval_in_steps"] = 1  # the whole loss curve (logging costs nothing)
    lora["model"]["config"].update(r=r, alpha=alpha, target_layers=["q_proj", "k_proj", "v_proj", "o_proj"])
    configs = {f"lora_r{r}": lora}
    lrs = full_lrs or [full["optimizer"]["config"]["lr"]]
    for i, lr in enumerate(lrs):
        variant = copy.deepcopy(full)
        variant["optimizer"]["config"]["lr"] = float(lr)
        configs["full" if i == 0 else f"full_lr{float(lr):.0e}"] = variant
    check_same_budget(configs)
    return configs


def check_same_budget(configs: dict[str, dict]) -> None:
    """Raise unless the configs differ only in `model` (and the components only it uses) and the learning rate."""

    def budget(config: dict) -> dict:
        c = copy.deepcopy(config)
        c.pop("model")
        c["optimizer"]["config"].pop("lr")
        return c

    reference_name, reference = next(iter(configs.items()))
    for name, config in configs.items():
        if budget(config) != budget(reference):
            a, b = budget(reference), budget(config)
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise SystemExit(f"{name} and {reference_name} differ beyond model and lr: {keys}")


# --- running ------------------------------------------------------------------------------------------------------
def run_one(name: str, config: dict, work: Path, threads: int | None = None) -> dict[str, Any]:
    """`lorafit run` in a child process; its wall time and peak RSS; the run folder's numbers."""
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_dir = work / "runs" / name
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
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the child
    load_before = os.getloadavg()
    log_path = work / f"{name}.log"
    print(f"[{name}] {' '.join(command[1:])}  (log: {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (ru_maxrss: KiB on Linux)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"[{name}] lorafit run failed ({child.returncode}):\n" + log_path.read_text()[-4000:])
    result = read_run(run_dir)
    result.update(
        wall_s=round(wall, 1),
        peak_rss_mb=round(usage.ru_maxrss / 1024),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
        load_avg_1min=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        trainable_params=trainable_params(config_path),
        learning_rate=config["optimizer"]["config"]["lr"],
        model=describe_model(config),
    )
    keep = RESULTS / "quality_lora_vs_full" / name
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    for file in KEPT_FILES:
        shutil.copy2(run_dir / file, keep / file)
    shutil.copy2(log_path, keep / "run.log")
    shown = {k: result[k] for k in ("accuracy_after", "heldout_loss_after", "train_s", "peak_rss_mb")}
    print(f"[{name}] done in {wall:.0f} s: {json.dumps(shown)}", flush=True)
    return result


def read_run(run_dir: Path) -> dict[str, Any]:
    # the run's one exact-match evaluator ("heldout" on the comparison task, "test" on the main job's splits)
    ((name, after),) = json.loads((run_dir / "eval_after.json").read_text()).items()
    before = json.loads((run_dir / "eval_before.json").read_text())[name]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    eval_key = next((k for r in rows for k in r if k.startswith("eval/") and k.endswith("/loss")), "eval/heldout/loss")
    evals = [r for r in rows if eval_key in r]
    wrong = [p for p in after["predictions"] if not p["correct"]]
    return {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "correct_after": after["correct"],
        "n": after["n"],
        "heldout_loss_before": before["loss"],
        "heldout_loss_after": after["loss"],
        "packed_eval_loss": {r["step"]: r[eval_key] for r in evals},
        "train_loss_first": train[0]["loss"],
        "train_loss_last5": sum(r["loss"] for r in train[-5:]) / len(train[-5:]),
        "train_loss_curve": {r["step"]: round(r["loss"], 4) for r in train},
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
        "train_s": train[-1]["elapsed_s"],
        "train_peak_rss_mb": train[-1].get("peak_rss_mb"),
        "samples_after": after["predictions"][:3],
        "wrong_after": wrong[:5],
    }


def trainable_params(config_path: Path) -> list[int]:
    """(trainable, total) from `lorafit validate` (the model built on the meta device: seconds)."""
    command = [sys.executable, "-m", "lorafit", "validate", "--config_file_path", str(config_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    match = re.search(r"trainable params: ([\d,]+) / ([\d,]+)", out.stdout + out.stderr)
    return [int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))] if match else []


def describe_model(config: dict) -> str:
    model = config["model"]
    if model.get("variant_key") == "lora":
        c = model["config"]
        return f"LoRA r={c['r']}, alpha {c['alpha']:g} on {','.join(c['target_layers'])}"
    return "full fine-tuning (every parameter)"


def hardware() -> dict[str, Any]:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "gpu": torch.cuda.is_available(),
    }


# --- the report ---------------------------------------------------------------------------------------------------
def results_markdown(report: dict[str, Any]) -> str:
    runs, hw = report["runs"], report["hardware"]
    first = next(iter(runs.values()))
    load = "; ".join(f"{n} {r['load_avg_1min'][0]}/{r['load_avg_1min'][1]}" for n, r in runs.items())
    lines = [
        f"Measured {report['date']} with `{report['command']}`: {first['steps']} steps each, "
        f"{first['tokens']:,} training tokens each, {first['n']} held-out examples.",
        f"Hardware: {hw['cpu']}, {hw['cores']} cores ({hw['torch_threads']} torch thread(s) per run), torch "
        f"{hw['torch']} (CPU), no GPU. Load average (1 min) "
        f"before/after each run: {load}.",
        "",
        "| run | trainable params | lr | exact match before -> after | held-out answer loss before -> after "
        "| train loss (last 5 steps) | train time | whole run (wall) | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        params = f"{r['trainable_params'][0]:,}" if r["trainable_params"] else "?"
        lines.append(
            f"| {name}: {r['model']} | {params} | {r['learning_rate']:g} | {r['accuracy_before']:.1%} -> "
            f"**{r['accuracy_after']:.1%}** ({r['correct_after']}/{r['n']}) | {r['heldout_loss_before']:.3f} -> "
            f"**{r['heldout_loss_after']:.3f}** | {r['train_loss_last5']:.3f} | {r['train_s']:.0f} s | "
            f"{r['wall_s']:.0f} s | {r['peak_rss_mb']:,} MB |"
        )
    lines += ["", "First held-out answers after training (the same three prompts for every run):", ""]
    for name, r in runs.items():
        for p in r["samples_after"]:
            mark = "ok" if p["correct"] else "wrong"
            lines.append(f"- {name} ({mark}): `{json.dumps(p['prediction'], ensure_ascii=False)}`")
    lines += ["", "Every wrong held-out answer after training (up to 5 per run):", ""]
    for name, r in runs.items():
        for p in r["wrong_after"]:
            lines.append(
                f"- {name}: `{json.dumps(p['prediction'], ensure_ascii=False)}`, expected "
                f"`{json.dumps(p['reference'], ensure_ascii=False)}`"
            )
        if not r["wrong_after"]:
            lines.append(f"- {name}: none")
    lines.append("")
    return "\n".join(lines)


def write_doc(report: dict[str, Any]) -> None:
    section = f"{BEGIN}\n{results_markdown(report)}{END}"
    if DOC.exists() and BEGIN in DOC.read_text():
        text = DOC.read_text()
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = f"# LoRA vs full fine-tuning: quality\n\n## Results\n\n{section}\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--full-lr", type=float, nargs="+", default=None, help="default: the full config's lr")
    parser.add_argument("--work-dir", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--keep-runs", action="store_true", help="keep the run folders (checkpoints: ~1.6 GB each)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (OMP_NUM_THREADS); 1 is much faster on a machine shared with "
        "other jobs, where 2 threads spin waiting for each other",
    )
    parser.add_argument("--only", nargs="+", default=None, help="run only these names (others are kept from the JSON)")
    parser.add_argument("--render-only", action="store_true", help="rewrite docs/quality.md from the JSON; no run")
    args = parser.parse_args()
    out_json = RESULTS / "quality_lora_vs_full.json"
    if args.render_only:
        write_doc(json.loads(out_json.read_text()))
        return

    configs = derive_configs(args.steps, args.full_lr)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lorafit-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out_json.read_text())["runs"] if args.only and out_json.exists() else {}
    command = "python scripts/quality_lora_vs_full.py " + " ".join(sys.argv[1:])
    runs = {}
    try:
        for name, config in configs.items():
            if args.only and name not in args.only:
                if name in previous:
                    runs[name] = previous[name]
                continue
            runs[name] = run_one(name, config, work, args.threads)
    finally:
        if not args.keep_runs and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": command.strip(),
        "runs": runs,
        "hardware": {**hardware(), "torch_threads": args.threads or hardware()["torch_threads"]},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    write_doc(report)
    print(results_markdown(report))
    print(f"wrote {out_json.relative_to(REPO)} and {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
