"""`target_layers` rules, every error case, and the `model/lora` component."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from lorafit.config.registry import REGISTRY
from lorafit.errors import UserError
from lorafit.lora import LoraLayer, apply_lora, get_settings, lora_layers
from lorafit.lora.component import LoraModelConfig, build_lora_model
from tiny import llama_config, make_llama


def adapted(model) -> list[str]:
    return [name for name, _ in lora_layers(model)]


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["q_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        (["mlp.down_proj"], ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
        (["layers.1.mlp.down_proj"], ["model.layers.1.mlp.down_proj"]),
        ([r"re:model\.layers\.0\.self_attn\.[qv]_proj"], [f"model.layers.0.self_attn.{p}_proj" for p in "qv"]),
        (["embed_tokens"], ["model.embed_tokens"]),
        # a duplicate entry and an overlapping one select each module once, in model order
        (
            ["v_proj", "q_proj", "self_attn.q_proj"],
            [f"model.layers.{i}.self_attn.{x}_proj" for i in "01" for x in "qv"],
        ),
    ],
)
def test_matching_rules(targets, expected):
    model = apply_lora(make_llama(), r=2, alpha=2, target_layers=targets)
    assert adapted(model) == expected
    assert get_settings(model).modules == {name: _first_entry(targets, name) for name in expected}


def _first_entry(targets, name):
    import re

    for t in targets:
        if (t.startswith("re:") and re.fullmatch(t[3:], name)) or name == t or name.endswith("." + t):
            return t
    raise AssertionError(name)


def test_regex_must_match_the_whole_name():
    with pytest.raises(UserError, match="must match the whole qualified name"):
        apply_lora(make_llama(), r=2, alpha=2, target_layers=["re:q_proj"])
    model = apply_lora(make_llama(), r=2, alpha=2, target_layers=["re:.*q_proj"])
    assert len(adapted(model)) == 2


def test_all_linear_leaves_out_the_output_head_and_embeddings():
    model = apply_lora(make_llama(tie_word_embeddings=False), r=2, alpha=2, target_layers="all-linear")
    names = adapted(model)
    assert len(names) == 14 and all(".layers." in n for n in names)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    both = apply_lora(make_llama(), r=2, alpha=2, target_layers=["all-linear", "embed_tokens"])
    assert adapted(both)[0] == "model.embed_tokens" and len(adapted(both)) == 15
    assert get_settings(both).embedding_targets == ["embed_tokens"]


def test_all_linear_without_get_output_embeddings_skips_lm_head():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("lm_head", nn.Linear(4, 9))
    apply_lora(model, r=2, alpha=2, target_layers=["all-linear"])
    assert adapted(model) == ["body"]


def test_no_match_lists_leaf_names_and_the_nearest():
    with pytest.raises(UserError) as info:
        apply_lora(make_llama(), r=2, alpha=2, target_layers=["q_proj", "q_prj", "mlp.down_prj"])
    problems = info.value.problems
    assert [p.path for p in problems] == ["target_layers[1]", "target_layers[2]"]
    assert "'q_prj' matches no module (did you mean 'q_proj'?)" in problems[0].message
    leaves = "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    assert problems[0].message.endswith(f"LoRA-capable layers here: {leaves}")
    assert "did you mean 'mlp.down_proj'?" in problems[1].message


def test_unsupported_types_and_bad_regex_are_named():
    with pytest.raises(UserError) as info:
        apply_lora(make_llama(), r=2, alpha=2, target_layers=["mlp", "re:(", "input_layernorm"])
    messages = {p.path: p.message for p in info.value.problems}
    assert (
        "matched model.layers.0.mlp, model.layers.1.mlp (LlamaMLP), which LoRA cannot wrap"
        in messages["target_layers[0]"]
    )
    assert "not a valid regular expression" in messages["target_layers[1]"]
    assert "(LlamaRMSNorm)" in messages["target_layers[2]"]


def test_subclass_of_linear_is_refused_with_its_type():
    class QuantLinear(nn.Linear):
        pass

    model = nn.Sequential()
    model.add_module("proj", QuantLinear(4, 4))
    with pytest.raises(UserError, match=r"proj \(QuantLinear\), which LoRA cannot wrap; supported: nn.Linear"):
        apply_lora(model, r=2, alpha=2, target_layers=["all-linear"])
    assert type(model.proj) is QuantLinear  # nothing changed
    # convolutions are wrapped (tests/unit/test_lora_conv.py); a transposed one is another type, refused as such
    model.add_module("up", nn.ConvTranspose2d(4, 4, 3))
    with pytest.raises(UserError) as info:
        apply_lora(model, r=2, alpha=2, target_layers=["up"])
    assert info.value.problems[0].message == (
        "'up' matched up (ConvTranspose2d), which LoRA cannot wrap; supported: nn.Linear, nn.Embedding, transformers "
        "Conv1D (GPT-2), nn.Conv1d/Conv2d/Conv3d (groups=1, dilation=1, padding_mode='zeros')"
    )


def test_hyper_parameter_errors_are_collected():
    with pytest.raises(UserError) as info:
        apply_lora(make_llama(), r=0, alpha=0, target_layers=[], dropout=1.0, init="xavier")
    assert [p.path for p in info.value.problems] == ["r", "alpha", "dropout", "init", "target_layers"]


def test_lora_twice_is_refused():
    model = apply_lora(make_llama(), r=2, alpha=2, target_layers=["q_proj"])
    with pytest.raises(UserError, match="already has LoRA on 2 modules"):
        apply_lora(model, r=2, alpha=2, target_layers=["v_proj"])


def test_component_builds_and_reports(capsys):
    spec = REGISTRY.get("model", "lora")
    assert spec.builder is build_lora_model and spec.config_model is LoraModelConfig
    config = LoraModelConfig(model=make_llama(), r=4, alpha=8, target_layers=["q_proj", "v_proj"], use_rslora=True)
    model = build_lora_model(config)
    assert len(adapted(model)) == 4 and get_settings(model).scaling == pytest.approx(4.0)
    assert "trainable params: 896 / " in capsys.readouterr().out


def test_component_on_meta_model_and_error_fields():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        meta = LlamaForCausalLM(llama_config())
    model = build_lora_model(LoraModelConfig(model=meta, r=2, alpha=4, target_layers=["all-linear"]))
    assert all(isinstance(m, LoraLayer) and m.lora_A.weight.is_meta for _, m in lora_layers(model))
    with pytest.raises(UserError) as info:
        build_lora_model(LoraModelConfig(model=make_llama(), r=2, alpha=4, target_layers=["q_proj", "qproj"]))
    assert info.value.problems[0].path == "target_layers[1]"


@pytest.mark.parametrize(
    "bad",
    [
        {"r": 0},
        {"alpha": 0},
        {"target_layers": []},
        {"dropout": 1.0},
        {"init": "xavier"},
        {"rank": 4},  # unknown key
        {"model": "not a model"},
    ],
)
def test_component_config_validation(bad):
    values = {"model": nn.Linear(2, 2), "r": 2, "alpha": 2, "target_layers": ["all-linear"], **bad}
    with pytest.raises(ValidationError):
        LoraModelConfig(**values)
