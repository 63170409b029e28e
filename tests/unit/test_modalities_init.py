"""model/model_initialized + model_initialization/composed do what Modalities does to the same model: the reference
is modalities' own initializer (PyPI 0.5.0, whose coca patterns equal the lora branch's) applied to the model inside
a module named as Modalities' HuggingFacePretrainedModel names it (`huggingface_model.`)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from lorafit.components import load_builtin_components
from lorafit.config.graph import ConfigGraph
from lorafit.errors import UserError
from tiny import make_llama

MODEL = {"component_key": "model", "variant_key": "huggingface_pretrained_model", "config": {}}


def _graph(model_dir, **init) -> ConfigGraph:
    load_builtin_components()
    return ConfigGraph(
        {
            "hf": {**MODEL, "config": {"model_name": str(model_dir)}},
            "model": {
                "component_key": "model",
                "variant_key": "model_initialized",
                "config": {
                    "model": {"instance_key": "hf", "pass_type": "BY_REFERENCE"},
                    "model_initializer": {
                        "component_key": "model_initialization",
                        "variant_key": "composed",
                        "config": init,
                    },
                },
            },
        }
    )


class _ModalitiesWrapper(nn.Module):  # parameter names as modalities' HuggingFacePretrainedModel has them
    def __init__(self, model: nn.Module):
        super().__init__()
        self.huggingface_model = model


def _modalities_initialized(model_dir, seed: int, **init) -> dict[str, torch.Tensor]:
    from modalities.nn.model_initialization.composed_initialization import ComposedInitializationRoutines
    from modalities.nn.model_initialization.parameter_name_filters import SupportWeightInitModels, WeightInitTypes
    from transformers import AutoModelForCausalLM

    wrapper = _ModalitiesWrapper(AutoModelForCausalLM.from_pretrained(model_dir))
    routine = ComposedInitializationRoutines.get_composed_model_initializer(
        model_type=SupportWeightInitModels(init.pop("model_type")),
        weight_init_type=WeightInitTypes(init.pop("weight_init_type")),
        **init,
    )
    torch.manual_seed(seed)
    routine.initialize_in_place(wrapper)
    return wrapper.huggingface_model.state_dict()


def test_coca_redraws_every_non_norm_weight_of_a_pretrained_model_as_modalities(tiny_model_dir, caplog):
    init = {"model_type": "coca", "weight_init_type": "plain", "mean": 0.0, "std": "auto", "hidden_dim": 32}
    torch.manual_seed(7)
    with caplog.at_level(logging.WARNING):
        ours = _graph(tiny_model_dir, **init).build("model").state_dict()
    theirs = _modalities_initialized(tiny_model_dir, 7, **init)
    before = make_llama().state_dict()  # the folder's weights (seed 0)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
        changed = not torch.equal(ours[name], before[name])
        assert changed == ("norm" not in name), name  # norms keep their values, every other weight is redrawn
    std = ours["model.layers.0.mlp.up_proj.weight"].std().item()
    assert math.isclose(std, math.sqrt(2 / (5 * 32)), rel_tol=0.1)  # std "auto"
    assert "re-drew 15 of 20 parameter tensors of LlamaForCausalLM" in caplog.text


def test_gpt2_patterns_leave_a_hugging_face_model_pretrained_as_in_modalities(tiny_model_dir, caplog):
    init = {"model_type": "gpt2", "weight_init_type": "scaled_embed", "mean": 0.0, "std": 0.02, "num_layers": 2}
    with caplog.at_level(logging.WARNING):
        ours = _graph(tiny_model_dir, **init).build("model").state_dict()
    theirs = _modalities_initialized(tiny_model_dir, 0, **init)
    before = make_llama().state_dict()
    for name in ours:
        assert torch.equal(ours[name], before[name]) and torch.equal(theirs[name], before[name]), name
    assert "match no parameter of LlamaForCausalLM (Modalities names them huggingface_model.model." in caplog.text


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ({"std": "auto"}, "hidden_dim must be specified when std is 'auto'"),
        ({"std": 0.02, "hidden_dim": 8}, "hidden_dim must not be specified when std is a float value"),
        ({"std": 0.02, "weight_init_type": "scaled"}, "num_layers must be specified"),
        ({"std": 0.02, "num_layers": 2}, "num_layers must not be specified when weight_init_type is plain"),
        ({"std": 0.02, "model_type": "llama"}, r"model_type: Input should be 'gpt2' or 'coca' \(got 'llama'\)"),
    ],
)
def test_initializer_config_errors_name_the_key(tiny_model_dir, init, message):
    init = {"model_type": "gpt2", "weight_init_type": "plain", "mean": 0.0, **init}
    with pytest.raises(UserError, match=r"model.config.model_initializer.config.*" + message):
        _graph(tiny_model_dir, **init).build("model")


def test_model_initialized_needs_an_initializer_component(tiny_model_dir):
    graph = _graph(tiny_model_dir, model_type="gpt2", weight_init_type="plain", mean=0.0, std=0.02)
    graph.config["model"]["config"]["model_initializer"] = {"mean": 0.0}
    with pytest.raises(UserError, match=r"model.config.model_initializer: expected a 'model_initialization'"):
        graph.build("model")
