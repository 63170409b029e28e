"""Peak RSS per rank of `lorafit run` under fsdp2 on 2 CPU processes: whole model on every rank vs meta build.

Two contenders, the same run apart from one key (`parallelism.config.load_after_sharding`):
- `whole`: every rank builds the model and loads all of its weights, then FSDP2 shards it (the path before
  the meta build; `load_after_sharding: false`);
- `meta` (the default): every rank builds the model on the meta device, LoRA is injected there, FSDP2 shards it,
  and each rank reads only its shards of the weights file (lorafit/models/shard_loading.py).

The model is a Llama with SmolLM-1.7B's shape (hidden 2048, 24 layers, 32 heads, 32 KV heads, MLP 8192,
vocab 49152, tied embeddings), random weights written by this script as bf16 safetensors shards (as on the hub)
into --workdir: nothing is downloaded. The tokenizer is SmolLM2-135M's (--model; the same 49152 tokens). Each
contender runs `lorafit run` under torchrun (2 processes, gloo) for --steps steps of LoRA (q, v; r 8) on the
lorem-ipsum text, one contender after the other (never at once: the whole-model path takes a full fp32 copy,
6.8 GB, per rank). Every rank writes its peak resident set (getrusage ru_maxrss and VmHWM) at exit.

    python benchmarks/fsdp2_meta_memory.py                 # SmolLM-1.7B shape (needs ~24 GB free for `whole`)
    python benchmarks/fsdp2_meta_memory.py --shape tiny    # a 2-layer model: checks the script, measures nothing
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import _common as common

SHAPES = {
    "smollm-1.7b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    ),
}
CONTENDERS = {"whole": False, "meta": True}  # name -> load_after_sharding
LAYERS_PER_FILE = 2


def parse_args(argv: list[str] | None = None):
    parser = common.base_parser(__doc__.splitlines()[0], reps=1)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm-1.7b")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/lorafit_fsdp2_meta"),
        help="where the random model, the data cache and the runs go (deleted at the end)",
    )
    parser.add_argument("--keep", action="store_true", help="keep --workdir")
    return parser.parse_args(argv)


def write_model(folder: Path, shape: dict) -> int:
    """config.json + bf16 safetensors shards (LAYERS_PER_FILE decoder layers each) + index; returns the number of
    parameters. Written layer by layer: the writer never holds more than one file's tensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        **shape,
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)

    def group(name: str) -> int:  # which file: layers in groups, the rest (embeddings, final norm) in the last
        return int(name.split(".")[2]) // LAYERS_PER_FILE if name.startswith("model.layers.") else -1

    groups = sorted({group(k) for k in shapes}, key=lambda g: (g < 0, g))
    weight_map = {}
    for i, g in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in (k for k in shapes if group(k) == g):
            shape_ = shapes[name]
            values = torch.ones(shape_) if len(shape_) == 1 else torch.randn(shape_, generator=generator) * 0.02
            tensors[name] = values.to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(math.prod(s) for s in shapes.values())  # the tied head counted once


def run_config(model: Path, tokenizer: Path, cache: Path, args, load_after_sharding: bool) -> dict:
    return {
        "settings": {
            "seed": 7,
            "step_profile": {
                "local_train_micro_batch_size": 1,
                "gradient_accumulation_steps": 1,
                "sequence_length": args.sequence_length,
            },
            "training_target": {"num_target_steps": args.steps},
            "intervals": {"training_log_interval_in_steps": 1},
        },
        "tokenizer": {"component_key": "tokenizer", "variant_key": "huggingface", "config": {"path": str(tokenizer)}},
        "base_model": {
            "component_key": "model",
            "variant_key": "huggingface_pretrained_model",
            "config": {"model_name_or_path": str(model)},
        },
        "model": {
            "component_key": "model",
            "variant_key": "lora",
            "config": {
                "r": 8,
                "alpha": 16,
                "target_layers": ["q_proj", "v_proj"],
                "model": {"instance_key": "base_model", "pass_type": "BY_REFERENCE"},
            },
        },
        "train_dataset": {
            "component_key": "dataset",
            "variant_key": "text",
            "config": {
                "path": str(common.REPO / "data" / "lorem_ipsum" / "lorem_ipsum.txt"),
                "cache_path": str(cache / "lorem"),
                "tokenizer": {"instance_key": "tokenizer", "pass_type": "BY_REFERENCE"},
            },
        },
        "parallelism": {
            "component_key": "parallelism",
            "variant_key": "fsdp2",
            "config": {"load_after_sharding": load_after_sharding},
        },
        "optimizer": {"component_key": "optimizer", "variant_key": "adamw", "config": {"lr": 1e-4}},
    }


def run_contender(name: str, config: Path, workdir: Path, threads: int | None) -> dict:
    """`lorafit run` under torchrun with 2 processes; each rank's peak memory, the losses and the wall time."""
    peaks = workdir / f"peak_{name}"
    shutil.rmtree(peaks, ignore_errors=True)
    peaks.mkdir(parents=True)
    command = common.torchrun_command(
        2,
        common.BENCH_DIR / "_rank_peak_rss.py",
        "run",
        "--config_file_path",
        str(config),
        "--experiments_root_path",
        str(workdir / "runs"),
        "--experiment_id",
        name,
    )
    env = {
        **os.environ,
        "LORAFIT_PEAK_RSS_DIR": str(peaks),
        "OMP_NUM_THREADS": str(threads or 1),
        "PYTHONPATH": str(common.BENCH_DIR),
    }
    started = time.perf_counter()
    log = workdir / f"{name}.log"
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=common.REPO).returncode
    wall = time.perf_counter() - started
    ranks = [json.loads((peaks / f"rank{r}.json").read_text()) for r in (0, 1) if (peaks / f"rank{r}.json").exists()]
    if code != 0 or len(ranks) != 2:
        raise RuntimeError(f"{name}: torchrun exited {code}:\n" + log.read_text()[-4000:])
    rows = [json.loads(x) for x in (workdir / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    said = log.read_text()
    return {
        "peak_rss_bytes_per_rank": [r["ru_maxrss_bytes"] for r in ranks],
        "vm_hwm_bytes_per_rank": [r.get("vm_hwm_bytes") for r in ranks],
        "losses": [r["loss"] for r in rows if "loss" in r],
        "wall_s": wall,
        "meta_build_said": "built on the meta device" in said,
    }


def _check_free_memory(fp32_bytes: int) -> None:
    """`whole` holds about 1.3 fp32 copies per rank at its peak: refuse to start (rather than have the kernel
    kill something) when the machine has not that much left for the 2 ranks."""
    available = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemAvailable:")
    )
    if available < 2.6 * fp32_bytes:
        needed = 2.6 * fp32_bytes / 1024**3
        raise SystemExit(
            f"{available / 1024**3:.1f} GiB available, the whole-model path needs about {needed:.1f} "
            "GiB for 2 ranks: free memory or use --shape tiny"
        )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tokenizer = common.model_dir(args.model)
    workdir = args.workdir
    shutil.rmtree(workdir, ignore_errors=True)
    started = time.perf_counter()
    n_params = write_model(workdir / "model", SHAPES[args.shape])
    _check_free_memory(n_params * 4)
    write_s = time.perf_counter() - started
    import yaml

    results = {}
    try:
        for name, after in CONTENDERS.items():  # one after the other: never two trainings at once
            config = workdir / f"{name}.yaml"
            config.write_text(yaml.safe_dump(run_config(workdir / "model", tokenizer, workdir / "cache", args, after)))
            results[name] = run_contender(name, config, workdir, args.threads)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    gib = 1024**3
    whole, meta = results["whole"], results["meta"]
    ratios = [m / w for m, w in zip(meta["peak_rss_bytes_per_rank"], whole["peak_rss_bytes_per_rank"], strict=True)]
    rows = [
        [
            name,
            *(f"{b / gib:.2f}" for b in r["peak_rss_bytes_per_rank"]),
            f"{r['wall_s']:.0f}",
            ", ".join(f"{x:.4f}" for x in r["losses"]),
        ]
        for name, r in results.items()
    ]
    table = common.markdown_table(
        ["path", "rank 0 peak RSS (GiB)", "rank 1 peak RSS (GiB)", "wall (s)", "losses"], rows
    )
    result = {
        "shape": args.shape,
        "model_parameters": n_params,
        "fp32_model_bytes": n_params * 4,
        "steps": args.steps,
        "sequence_length": args.sequence_length,
        "write_model_s": write_s,
        "runs": results,
        "ratios": {"meta_over_whole_peak_rss_per_rank": ratios},
        "table": table,
        "hardware": common.hardware(),
    }
    print(table)
    print(f"peak RSS per rank, meta / whole: {', '.join(f'{r:.3f}' for r in ratios)}")
    common.write_results(args.out, "fsdp2_meta_memory", result)
    fig, (ax,) = common.new_figure()
    for offset, (name, r) in zip((-0.2, 0.2), results.items(), strict=True):
        ax.bar([i + offset for i in (0, 1)], [b / gib for b in r["peak_rss_bytes_per_rank"]], width=0.4, label=name)
    ax.set_xticks([0, 1], ["rank 0", "rank 1"])
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title(f"lorafit run, fsdp2 on 2 CPU processes ({args.shape})", fontsize=10)
    ax.legend()
    common.save_figure(fig, args.out, "fsdp2_meta_memory")
    return result


if __name__ == "__main__":
    main()
