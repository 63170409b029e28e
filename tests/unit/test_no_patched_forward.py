"""No behaviour hides in a patched forward: after a run is built and wrapped for training, every module's forward is
its own class's (STYLE.md: no assigning to a module's `forward`). Measured on the built objects, not on spelling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tiny_runs import tiny_run_config

REPO = Path(__file__).resolve().parents[2]


def patched_forwards(root: nn.Module) -> list[str]:
    """Modules whose `forward` is not their class's: set on the instance, or bound to another function."""
    return [
        f"{name or '<root>'} ({type(m).__name__})"
        for name, m in root.named_modules()
        if "forward" in vars(m) or getattr(m.forward, "__func__", None) is not type(m).forward
    ]


def test_the_check_sees_a_patched_forward():
    layer = nn.Linear(2, 2)
    assert patched_forwards(nn.Sequential(layer)) == []
    layer.forward = lambda x: x  # what the check exists to catch
    assert patched_forwards(nn.Sequential(layer)) == ["0 (Linear)"]


@pytest.mark.parametrize("variant", ["lora", "lora_bf16_base"])
def test_a_built_and_wrapped_run_has_only_its_classes_forwards(tmp_path, tiny_model_dir, variant):
    from lorafit.distributed.env import DistEnv
    from lorafit.distributed.parallel import ParallelismConfig, Strategy
    from lorafit.run.build import build_run, load_run_config
    from lorafit.training.loss import CausalLMLoss
    from lorafit.training.swiglu import lean_mlps

    config = tiny_run_config(tiny_model_dir, cache_path=tmp_path / "cache")
    if variant == "lora_bf16_base":
        config["model"]["config"]["frozen_dtype"] = "bfloat16"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run = build_run(load_run_config(path)[1])
    assert patched_forwards(run.model) == []
    # what the loop wraps: the loss module, activation checkpointing, and the lean MLPs during the steps
    strategy = Strategy(ParallelismConfig(activation_checkpointing=True))
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    wrapped = strategy.wrap(CausalLMLoss(run.model), env, None)
    with lean_mlps(run.model):
        assert patched_forwards(wrapped) == []


@pytest.mark.usefixtures("smollm2_dir")  # the config reads the real SmolLM2 folder: `slow` (tests/conftest.py)
def test_a_built_modalities_run_has_only_its_classes_forwards(monkeypatch):
    from lorafit.config.context import build_context
    from lorafit.run.build import build_run, load_run_config

    monkeypatch.chdir(REPO)
    config = REPO / "configs" / "modalities" / "config_lorem_ipsum_lora.yaml"
    graph = load_run_config(
        config, overrides=("settings.training.sequence_length=128", "evaluation_subscriber.config.mode=OFFLINE")
    )[1]
    with build_context(meta_device=True, load_weights=False, announce=False):
        run = build_run(graph)
    assert patched_forwards(run.model) == []
