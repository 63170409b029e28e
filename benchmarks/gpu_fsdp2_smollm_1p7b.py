"""LoRA training throughput of a SmolLM-1.7B-shaped model under FSDP2 + bf16: tokens/s and MFU.

The model is random (no download): LlamaForCausalLM with SmolLM-1.7B's shape (24 layers, hidden 2048, MLP 8192,
32 heads, vocab 49152, tied embeddings), built on the meta device and set up in lorafit's documented order:

    build (meta) -> inject LoRA -> freeze -> activation checkpointing -> shard (fully_shard per block, root)
    -> materialise on the GPU -> random weights (each rank fills only its shards)

and trained by lorafit's own loop (`lorafit.training.loop.train`) on random tokens, so the numbers are those of
`lorafit run`. Run on GPUs with torchrun (one process per GPU; with one GPU FSDP2 still runs, on a 1-rank mesh):

    torchrun --standalone --nproc_per_node 8 benchmarks/gpu_fsdp2_smollm_1p7b.py --steps 30
    torchrun --standalone --nproc_per_node 1 benchmarks/gpu_fsdp2_smollm_1p7b.py --activation_checkpointing

It prints one JSON object (also written to --out): median tokens/s over the steps after --warmup, tokens/s per
GPU, peak GPU memory, and MFU = model FLOPs per second / (GPUs x --peak_tflops). Model FLOPs per token for LoRA
with a frozen base: forward 2N + backward through activations only 2N (no weight gradients for the base), plus
attention (12 x layers x hidden x sequence for forward + backward, PaLM's count with causal masking ignored),
plus the adapters' full 6 x N_lora; activation-checkpointing recomputation is not counted (that would be HFU).

`--tiny` runs the same path with a 2-layer model on CPU (gloo), as the tests do, to check the script itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

SMOLLM_1P7B = dict(
    vocab_size=49152,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=24,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
TINY = dict(
    SMOLLM_1P7B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the medians (allocator, autotuning)")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--sequence_length", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument(
        "--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM: 989)")
    p.add_argument("--out", type=Path, default=None, help="JSON result file (default: print only)")
    p.add_argument("--tiny", action="store_true", help="2-layer model on CPU: checks the script, measures nothing")
    return p.parse_args(argv)


class RandomTokens(torch.utils.data.Dataset):
    """Deterministic random rows: labels are the next token (the datasets' shifted-label contract)."""

    def __init__(self, n: int, length: int, vocab: int):
        self.n, self.length, self.vocab = n, length, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = torch.randint(0, self.vocab, (self.length + 1,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": row[:-1], "labels": row[1:]}


def random_weights(config) -> callable:
    """`fill_weights_after_sharding` for a model materialised with `to_empty`: each rank fills its own shards."""

    def load(model: torch.nn.Module) -> None:
        from lorafit.lora import reset_lora_parameters
        from lorafit.models.wrappers import local_tensor

        generator = torch.Generator(device="cpu").manual_seed(1234 + int(os.environ.get("RANK", "0")))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    continue
                local = local_tensor(param)
                values = torch.ones(local.shape) if local.ndim == 1 else torch.randn(local.shape, generator=generator)
                local.copy_(values if local.ndim == 1 else values * 0.02)
            reset_lora_parameters(model, seed=0)
            for module in model.modules():  # non-persistent rotary tables were left empty by to_empty
                if hasattr(module, "inv_freq") and hasattr(module, "original_inv_freq"):
                    fresh = type(module)(config=config)
                    module.inv_freq.copy_(fresh.inv_freq)
                    module.original_inv_freq.copy_(fresh.original_inv_freq)

    return load


def flops_per_token(config, n_frozen: int, n_lora: int, seq: int) -> float:
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq
    return 4 * n_frozen + 6 * n_lora + attention


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafit.config.run_spec import RunSettings
    from lorafit.distributed.env import init_distributed
    from lorafit.distributed.parallel import FSDP2Strategy, ParallelismConfig
    from lorafit.lora import apply_lora
    from lorafit.training.job import TrainJob
    from lorafit.training.loop import train
    from lorafit.training.optim import AdamWConfig, CosineConfig, OptimizerFactory, SchedulerFactory

    if args.tiny:
        args.steps, args.warmup, args.sequence_length, args.micro_batch_size = min(args.steps, 4), 1, 32, 2
    env = init_distributed(device="cpu" if args.tiny else None)
    if env.device.type != "cuda" and not args.tiny:
        raise SystemExit("no CUDA device: this benchmark needs GPUs (use --tiny to check the script on CPU)")
    config = LlamaConfig(**(TINY if args.tiny else SMOLLM_1P7B))

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    apply_lora(model, args.r, args.alpha, args.targets)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    strategy = FSDP2Strategy(
        ParallelismConfig(
            mixed_precision=args.precision, activation_checkpointing=args.activation_checkpointing, compile=args.compile
        )
    )
    global_batch = args.micro_batch_size * args.gradient_accumulation_steps * env.world_size
    run_dir = Path(tempfile.mkdtemp(prefix="lorafit_bench_")) if env.is_main else None
    run_dir = Path(env.broadcast_object(str(run_dir) if run_dir else None))
    job = TrainJob(
        model=model,
        train_dataset=RandomTokens(global_batch * (args.steps + 1), args.sequence_length, config.vocab_size),
        optimizer_factory=OptimizerFactory(AdamWConfig(lr=1e-4)),
        scheduler_factory=SchedulerFactory(CosineConfig(warmup_steps=0)),
        env=env,
        run_dir=run_dir,
        settings=RunSettings.model_validate(
            {
                "step_profile": {
                    "local_train_micro_batch_size": args.micro_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "sequence_length": args.sequence_length,
                },
                "training_target": {"num_target_steps": args.steps},
            }
        ),
        parallelism=strategy,
        fill_weights_after_sharding=random_weights(config),
        shuffle=False,
        progress=False,
        write_adapter=False,
    )
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    started = time.perf_counter()
    result = train(job)
    wall = time.perf_counter() - started

    summary: dict = {}
    if env.is_main:
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        durations = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(steps)]
        measured = durations[args.warmup :] or durations or [wall / max(1, args.steps)]
        step_s = statistics.median(measured)
        tokens_per_step = global_batch * args.sequence_length
        tokens_per_s = tokens_per_step / step_s
        model_flops = flops_per_token(config, n_frozen, n_lora, args.sequence_length) * tokens_per_s
        summary = {
            "model": "SmolLM-1.7B shape (random)" if not args.tiny else "tiny (script check)",
            "gpus": env.world_size,
            "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
            "precision": args.precision,
            "activation_checkpointing": args.activation_checkpointing,
            "compile": args.compile,
            "params_frozen": n_frozen,
            "params_lora": n_lora,
            "global_batch": global_batch,
            "sequence_length": args.sequence_length,
            "median_step_s": round(step_s, 4),
            "tokens_per_s": round(tokens_per_s, 1),
            "tokens_per_s_per_gpu": round(tokens_per_s / env.world_size, 1),
            "mfu": round(model_flops / (env.world_size * args.peak_tflops * 1e12), 4),
            "peak_cuda_mb": steps[-1].get("peak_cuda_mb"),
            "loss_first_last": [steps[0]["loss"], steps[-1]["loss"]],
            "steps": result.steps,
        }
        print(json.dumps(summary, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summary, indent=2) + "\n")
    env.barrier()
    env.destroy()
    return summary


if __name__ == "__main__":
    main()
