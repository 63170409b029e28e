"""Shared pieces of the engine tests: a small in-memory token dataset and a TrainJob on the tiny Llama."""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ["q_proj", "v_proj", "down_proj"]


class TokenDataset(torch.utils.data.Dataset):
    """Random token rows with a masked prefix of varying length, so micro-batches hold different numbers of
    target tokens (the loss normalisation has to get that right)."""

    def __init__(self, n: int = 48, length: int = 12, seed: int = 0, vocab: int = 384):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(3, vocab, (n, length + 1), generator=g)
        self.masked = torch.randint(0, length - 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        labels = row[1:].clone()
        labels[: int(self.masked[i])] = -100
        return {"input_ids": row[:-1], "labels": labels}


def lora_model(dropout: float = 0.0, seed: int = 3):
    from lorafit.lora import apply_lora
    from tiny import make_llama

    return apply_lora(make_llama(), r=4, alpha=8, target_layers=TARGETS, dropout=dropout, seed=seed)


def make_job(run_dir: Path, env, *, parallelism=None, micro: int, accum: int, steps: int, **overrides):
    """A TrainJob on the tiny LoRA model; `overrides` replace TrainJob fields or, by their YAML names under
    `settings` (seed, intervals, checkpointing, gradient_clipping, eval_max_batches), settings."""
    from lorafit.config.run_spec import RunSettings
    from lorafit.data import collate
    from lorafit.training.job import TrainJob
    from lorafit.training.optim import AdamWConfig, CosineConfig, OptimizerFactory, SchedulerFactory

    settings = {
        "seed": overrides.pop("seed", 5),
        "step_profile": {"local_train_micro_batch_size": micro, "gradient_accumulation_steps": accum},
        "training_target": {"num_target_steps": steps},
        "intervals": {
            "evaluation_interval_in_steps": overrides.pop("evaluation_interval_in_steps", 2),
            "checkpointing_interval_in_steps": overrides.pop("checkpointing_interval_in_steps", None),
        },
        "checkpointing": {"keep_last": overrides.pop("keep_last", 2)},
        "gradient_clipping": overrides.pop("gradient_clipping", 1.0),
        "eval_max_batches": overrides.pop("eval_max_batches", None),
    }
    values = dict(
        model=lora_model(overrides.pop("dropout", 0.0)),
        train_dataset=TokenDataset(),
        eval_datasets={"held_out": TokenDataset(n=7, seed=1)},
        collate_fn=collate,
        optimizer_factory=OptimizerFactory(AdamWConfig(lr=2e-2, weight_decay=0.01)),
        scheduler_factory=SchedulerFactory(CosineConfig(warmup_steps=1, min_lr_ratio=0.1)),
        parallelism=parallelism,
        env=env,
        run_dir=Path(run_dir),
        settings=RunSettings.model_validate(settings),
        progress=False,
    )
    values.update(overrides)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return TrainJob(**values)
