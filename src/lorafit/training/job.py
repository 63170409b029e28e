"""What `train` takes (`TrainJob`) and gives back (`TrainResult`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorafit.checkpoint.trained_weights import is_sharded, unsharded_copy
from lorafit.config.layouts import EvalLoss, LossNormalization
from lorafit.config.run_spec import RunSettings
from lorafit.distributed.env import DistEnv
from lorafit.distributed.parallel import Strategy, gather_full_state_dict
from lorafit.models.wrappers import unwrap
from lorafit.training.trackers import Tracker

if TYPE_CHECKING:  # annotations only
    from torch.utils.data import Dataset
    from transformers import PreTrainedTokenizerBase


@dataclass
class TrainJob:
    """One training run. The model arrives built and (normally) with its weights loaded, on CPU: with LoRA
    injected and the base frozen, or without LoRA and every parameter trainable (full fine-tuning). `train`
    wraps it with `parallelism` (None: fsdp2 under torchrun, else none)."""

    model: nn.Module
    train_dataset: Dataset  # map-style: items {"input_ids", "labels"} (labels already shifted; -100 = ignored)
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer]
    scheduler_factory: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]
    env: DistEnv
    run_dir: Path  # exists
    # the config's `settings` block, validated: batch shape, training target, seed, intervals, checkpointing,
    # gradient clipping. The loop reads it directly; nothing is copied out of it under other names.
    settings: RunSettings
    collate_fn: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None
    eval_datasets: Mapping[str, Dataset] = field(default_factory=dict)
    parallelism: Strategy | None = None  # None: fsdp2 under torchrun, else none
    shuffle: bool = True
    samples_per_epoch: int | None = None  # the sampler's epoch length when the config layout fixes it (BuiltRun)
    eval_batch_sizes: Mapping[str, int] = field(default_factory=dict)  # as BuiltRun's: the held-out evaluation
    eval_loss: EvalLoss = "token_mean"
    eval_at_start: bool = False
    resume_from: str | os.PathLike | None = None  # None, "latest" or a checkpoint folder
    stop_at_step: int | None = None  # pause there (checkpoint written) although the run targets num_steps
    # target positions per chunk of the fused output head + CE (None: all at once); 256 SmolLM2 rows = 48 MiB of
    # fp32 logits, and on CPU the head runs as fast in chunks of 256 as in one piece
    loss_chunk_tokens: int | None = 256
    # a model built on the meta device: called with it after sharding, to put each rank's weights into its shards
    fill_weights_after_sharding: Callable[[nn.Module], None] | None = None
    gather_full_model: bool = False  # keep an unsharded copy on rank 0 for model_for_eval() after FSDP2
    source_fingerprints: dict[str, str] | None = None  # {yaml path: sha256} of the training files (resume checks)
    progress: bool | None = None  # rich progress bar; None: when stdout is a terminal
    write_adapter: bool = True  # write the trained weights: adapter/ (LoRA) or model/ (full); False: neither
    # saved into model/ after full fine-tuning, so the folder loads and generates alone
    tokenizer: PreTrainedTokenizerBase | None = None
    loss_normalization: LossNormalization = "global_tokens"  # what a step's loss is the mean of (config/layouts.py)
    # rank 0's open trackers (training/trackers.py); None: TensorBoard, if installed
    trackers: list[Tracker] | None = None


@dataclass
class TrainResult:
    model: nn.Module  # as trained: possibly DDP-wrapped or sharded
    run_dir: Path
    env: DistEnv
    steps: int
    tokens: int
    elapsed_s: float
    losses: list[tuple[int, float]]  # (step, loss) of the steps trained by this call
    eval_losses: dict[str, float] = field(default_factory=dict)  # the last evaluation
    adapter_dir: Path | None = None  # LoRA: the adapter in PEFT's format
    model_dir: Path | None = None  # full fine-tuning: the whole model as a Hugging Face folder
    resumed_from: Path | None = None
    last_checkpoint: Path | None = None
    full_state_dict: dict[str, torch.Tensor] | None = None  # rank 0, when gathered for evaluation
    _eval_model: nn.Module | None = field(default=None, repr=False)

    def model_for_eval(self) -> nn.Module:
        """An unwrapped, unsharded model with the trained weights (rank 0), in eval mode: the trained model
        itself, or after FSDP2 a plain copy built from the gathered weights (with the same LoRA, if any)."""

        if self._eval_model is None:
            inner = unwrap(self.model)
            if not is_sharded(inner):
                self._eval_model = inner
            else:
                full = self.full_state_dict
                if full is None and self.env.world_size == 1:  # a one-rank group: gathering needs no other rank
                    full = gather_full_state_dict(self.model, self.env)
                if full is None:
                    raise RuntimeError("the model is sharded: train with gather_full_model=True to evaluate on rank 0")
                self._eval_model = unsharded_copy(inner, full)
        return self._eval_model.eval()

    def summary(self) -> str:
        last = f"{self.losses[-1][1]:.4f}" if self.losses else "n/a"
        first = f"{self.losses[0][1]:.4f}" if self.losses else "n/a"
        lines = [f"steps: {self.steps}, tokens: {self.tokens:,}, time: {self.elapsed_s:.1f} s, loss: {first} -> {last}"]
        lines += [f"eval {name} loss: {value:.4f}" for name, value in self.eval_losses.items()]
        if self.resumed_from:
            lines.append(f"resumed from: {self.resumed_from}")
        if self.adapter_dir:
            lines.append(f"adapter: {self.adapter_dir}")
        if self.model_dir:
            lines.append(f"model: {self.model_dir}")
        return "\n".join(lines)
