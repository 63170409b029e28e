"""Optimizer and schedule components: weight-decay groups, schedule shapes, config checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch


def _build(component_key: str, variant_key: str, config: dict):
    import lorafit.training.optim  # noqa: F401 - registers the components
    from lorafit.config.registry import REGISTRY

    spec = REGISTRY.get(component_key, variant_key)
    return spec.builder(spec.config_model.model_validate(config))


def _lrs(scheduler_config: tuple[str, dict], steps: int, lr: float = 1.0) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(2, 2))
    model = torch.nn.Linear(2, 2)
    model.weight = param
    optimizer = _build("optimizer", "adamw", {"lr": lr})(model)
    scheduler = _build("scheduler", *scheduler_config)(optimizer, steps)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_adamw_groups_skip_biases_and_norms():
    from tiny import make_llama

    model = make_llama()  # full fine-tuning: every parameter trainable
    model.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(32))
    optimizer = _build("optimizer", "adamw", {"lr": 3e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]})(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.95) and decay["lr"] == 3e-4
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.norm.weight" in no_decay_names and "model.layers.0.self_attn.q_proj.bias" in no_decay_names
    assert all("norm" in n or n.endswith("bias") for n in no_decay_names)
    assert {names[id(p)] for p in decay["params"]} >= {"model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"}


def test_adamw_over_lora_takes_only_adapters():
    from lorafit.lora import apply_lora, lora_parameters
    from tiny import make_llama

    model = apply_lora(make_llama(), r=2, alpha=4, target_layers=["q_proj"])
    optimizer = _build("optimizer", "adamw", {"weight_decay": 0.01})(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in lora_parameters(model)}
    assert len(optimizer.param_groups) == 1  # A and B are matrices: all decay


def test_constant_with_warmup():
    assert _lrs(("constant", {"warmup_steps": 3}), 6) == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert _lrs(("constant", {}), 3) == [1.0, 1.0, 1.0]


def test_cosine_warmup_then_decay_to_min_ratio():
    lrs = _lrs(("cosine", {"warmup_fraction": 0.2, "min_lr_ratio": 0.1}), 10)
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])  # round(0.2 x 10) = 2 warmup steps
    assert lrs[2] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(lrs[2:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert _lrs(("cosine", {"warmup_steps": 0, "min_lr_ratio": 0.5}), 3)[0] == 1.0


def test_onecycle_peaks_at_pct_start():
    lrs = _lrs(("onecycle", {"max_lr": 0.01, "pct_start": 0.25, "div_factor": 10, "final_div_factor": 100}), 20)
    assert lrs[0] == pytest.approx(0.001)
    assert max(lrs) == pytest.approx(0.01) and lrs.index(max(lrs)) == 4  # 0.25 x 20 steps - 1
    assert lrs[-1] == pytest.approx(0.001 / 100)


def test_schedule_config_errors():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="warmup_steps or warmup_fraction"):
        _build("scheduler", "cosine", {"warmup_steps": 3, "warmup_fraction": 0.1})
    with pytest.raises(ValidationError, match="extra"):
        _build("optimizer", "adamw", {"learning_rate": 1e-3})
    with pytest.raises(ValidationError):
        _build("scheduler", "onecycle", {"max_lr": 1e-3, "anneal_strategy": "cosine"})


def test_loraplus_groups_and_one_step_honours_the_ratio():
    from lorafit.errors import UserError
    from lorafit.lora import apply_lora, named_lora_parameters
    from tiny import make_llama

    model = apply_lora(make_llama(), r=2, alpha=4, target_layers=["q_proj", "v_proj"], use_dora=True)
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient in the first step
        for name, param in named_lora_parameters(model):
            if name.endswith("lora_B.weight"):
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    optimizer = _build("optimizer", "adamw", {"lr": 1e-3, "weight_decay": 0.01, "loraplus_lr_ratio": 16})(model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        (g["lr"], g["weight_decay"], sorted(names[id(p)].rsplit(".", 2)[-2] for p in g["params"]))
        for g in optimizer.param_groups
    ]
    assert groups == [
        (1e-3, 0.01, ["lora_A"] * 4),
        (16e-3, 0.01, ["lora_B"] * 4),
        (16e-3, 0.0, ["q_proj", "q_proj", "v_proj", "v_proj"]),  # DoRA's magnitude vectors: 1-D, no decay
    ]
    # Adam's first step moves each element by about lr (times the sign of its gradient): B moves 16x as far as A
    before = {n: p.detach().clone() for n, p in named_lora_parameters(model)}
    x = torch.randint(0, 384, (2, 8), generator=torch.Generator().manual_seed(1))
    model.train()
    model(x, labels=x).loss.backward()
    optimizer.step()
    moved = {
        kind: max((p.detach() - before[n]).abs().max().item() for n, p in named_lora_parameters(model) if kind in n)
        for kind in ("lora_A", "lora_B")
    }
    assert moved["lora_A"] == pytest.approx(1e-3, rel=0.05)
    assert moved["lora_B"] == pytest.approx(16e-3, rel=0.05)
    with pytest.raises(UserError, match=r"optimizer.config.loraplus_lr_ratio: .*full fine-tuning"):
        _build("optimizer", "adamw", {"loraplus_lr_ratio": 16})(make_llama())
