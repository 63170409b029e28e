"""Modalities' optimizer and scheduler components: weight-decay groups as modalities decides them for a Hugging Face
model (reference: modalities 0.5.0's own OptimizerFactory on its HuggingFacePretrainedModel), and each scheduler
variant giving the learning rates of the torch scheduler Modalities builds from the same keys."""

from __future__ import annotations

import pytest
import torch

from lorafit.components import load_builtin_components
from lorafit.config.graph import ConfigGraph
from lorafit.errors import UserError

REF = {"instance_key": "model", "pass_type": "BY_REFERENCE"}


def _graph(model_dir, optimizer: dict, scheduler: dict | None = None) -> ConfigGraph:
    load_builtin_components()
    config = {
        "model": {
            "component_key": "model",
            "variant_key": "huggingface_pretrained_model",
            "config": {"model_name": str(model_dir)},
        },
        "optimizer": {
            "component_key": "optimizer",
            "variant_key": "adam_w",
            "config": {"lr": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "wrapped_model": REF, **optimizer},
        },
    }
    if scheduler is not None:
        opt = {"instance_key": "optimizer", "pass_type": "BY_REFERENCE"}
        config["scheduler"] = {**scheduler, "config": {"optimizer": opt, **scheduler["config"]}}
    return ConfigGraph(config)


def test_weight_decay_groups_on_a_hugging_face_model_as_modalities(tiny_model_dir):
    from modalities.models.huggingface.huggingface_model import HuggingFaceModelTypes, HuggingFacePretrainedModel

    # Modalities' Hugging Face wrapper defines no weight-decay groups (its gpt2 has linear, embedding, layernorm):
    # an excluded name is never one of its groups, which the lora branch raises for (0.5.0: no parameter is left)
    theirs = HuggingFacePretrainedModel(
        HuggingFaceModelTypes.AutoModelForCausalLM, str(tiny_model_dir), "logits", "logits", "input_ids"
    )
    assert theirs.weight_decay_groups == {}
    # weight_decay 0: one group of every trainable parameter, the exclusions have no effect (Modalities the same)
    graph = _graph(tiny_model_dir, {"weight_decay": 0.0, "weight_decay_groups_excluded": ["embedding"]})
    model = graph.build("model")
    ours = graph.build("optimizer")(model)
    assert [g["weight_decay"] for g in ours.param_groups] == [0.0]
    assert sum(p.numel() for p in ours.param_groups[0]["params"]) == sum(p.numel() for p in theirs.parameters())
    with pytest.raises(
        UserError,
        match=r"optimizer.config.weight_decay_groups_excluded: \['embedding'\]: Modalities' "
        r"weight decay groups .* Valid: \[\]",
    ):
        _graph(tiny_model_dir, {"weight_decay": 0.1, "weight_decay_groups_excluded": ["embedding"]}).build("optimizer")


@pytest.mark.parametrize(
    ("variant", "config", "reference"),
    [
        (
            "onecycle_lr",
            {
                "max_lr": 0.6,
                "div_factor": 10,
                "final_div_factor": 1,
                "total_steps": 12,
                "pct_start": 0.25,
                "anneal_strategy": "cos",
            },
            lambda o: torch.optim.lr_scheduler.OneCycleLR(
                o, max_lr=0.6, div_factor=10, final_div_factor=1, total_steps=12, pct_start=0.25, anneal_strategy="cos"
            ),
        ),
        ("step_lr", {"step_size": 3, "gamma": 0.5}, lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5)),
        (
            "constant_lr",
            {"factor": 0.25, "total_iters": 4},
            lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.25, total_iters=4),
        ),
        (
            "cosine_annealing_lr",
            {"t_max": 6, "eta_min": 0.01},
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6, eta_min=0.01),
        ),
        ("dummy_lr", {}, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0)),
    ],
)
def test_each_modalities_scheduler_gives_the_torch_schedule(tiny_model_dir, variant, config, reference):
    spec = {"component_key": "scheduler", "variant_key": variant, "config": config}
    graph = _graph(tiny_model_dir, {"weight_decay": 0.0, "weight_decay_groups_excluded": []}, spec)
    model = graph.build("model")
    lrs = []
    for make in (lambda o: graph.build("scheduler")(o, 12), reference):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler, seen = make(optimizer), []
        for _ in range(12):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        lrs.append(seen)
    assert lrs[0] == lrs[1] and model is not None
    if variant != "dummy_lr":
        with pytest.raises(UserError, match=r"scheduler.config.last_epoch: last_epoch is Modalities' manual resume"):
            graph.config["scheduler"]["config"]["last_epoch"] = 3
            ConfigGraph(graph.config).build("scheduler")
