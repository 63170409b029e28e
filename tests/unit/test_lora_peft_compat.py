"""Against the real `peft` package: same weights give the same logits and gradients, adapters load both ways."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from lorafit.errors import UserError
from lorafit.lora import (
    adapter_state_dict,
    apply_lora,
    get_settings,
    has_lora,
    load_adapter,
    lora_layers,
    lora_parameters,
    named_lora_parameters,
    save_adapter,
)
from lorafit.lora.adapter import peft_target_modules
from tiny import make_gpt2, make_llama

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft():
    import peft

    return peft


def tokens(vocab=384, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def randomise_adapters(model, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_param_name(our_name: str) -> str:
    """Our `x.lora_A.weight` is PEFT's `base_model.model.x.lora_A.default.weight` (embeddings: no `.weight`)."""
    if our_name.endswith(".weight"):
        return "base_model.model." + our_name[: -len(".weight")] + ".default.weight"
    return "base_model.model." + our_name + ".default"


def ours_and_peft(peft, make, targets, *, use_rslora=False, alpha=8):
    """Our model and a PeftModel on identical bases, carrying identical (non-trivial) A/B."""
    ours = apply_lora(make(), r=4, alpha=alpha, target_layers=targets, use_rslora=use_rslora)
    randomise_adapters(ours)
    config = peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=use_rslora)
    theirs = peft.get_peft_model(make(), config)
    result = peft.set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert not result.unexpected_keys
    theirs_params = dict(theirs.named_parameters())
    for name, param in named_lora_parameters(ours):  # every tensor arrived
        assert torch.equal(theirs_params[peft_param_name(name)], param)
    return ours, theirs


@pytest.mark.parametrize(
    ("make", "targets", "rslora", "vocab"),
    [
        (make_llama, LLAMA_TARGETS, False, 384),
        (make_llama, [*LLAMA_TARGETS, "embed_tokens"], True, 384),
        (make_gpt2, ["c_attn", "c_proj", "c_fc"], False, 128),  # Conv1D, fan_in_fan_out
    ],
    ids=["llama", "llama-embedding-rslora", "gpt2-conv1d"],
)
def test_same_weights_same_logits_and_gradients(peft, make, targets, rslora, vocab):
    ours, theirs = ours_and_peft(peft, make, targets, use_rslora=rslora)
    x = tokens(vocab)
    ours.train()
    theirs.train()
    out_ours, out_theirs = ours(x, labels=x), theirs(input_ids=x, labels=x)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=0, atol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    names = list(named_lora_parameters(ours))
    assert len(names) >= 8
    for name, param in names:
        assert param.grad is not None and param.grad.abs().sum() > 0
        torch.testing.assert_close(param.grad, theirs_params[peft_param_name(name)].grad, rtol=1e-4, atol=1e-5)
    trainable_theirs = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable_theirs == {peft_param_name(n) for n, _ in names}


@pytest.mark.parametrize(
    ("make", "targets", "vocab"),
    [
        (make_llama, LLAMA_TARGETS, 384),
        (make_llama, ["q_proj", "embed_tokens"], 384),
        (make_llama, [r"re:model\.layers\.1\.self_attn\.[kv]_proj", "layers.0.mlp.up_proj"], 384),
        (make_gpt2, ["c_attn", "mlp.c_proj"], 128),
    ],
    ids=["llama", "embedding", "partial-layers", "gpt2"],
)
def test_our_adapter_loads_in_peft(peft, tmp_path, make, targets, vocab):
    ours = apply_lora(make(), r=4, alpha=16, target_layers=targets, use_rslora=True, dropout=0.1)
    randomise_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "adapter").eval()
    x = tokens(vocab)
    torch.testing.assert_close(ours.eval()(x).logits, theirs(input_ids=x).logits, rtol=0, atol=1e-5)
    # PEFT put LoRA on exactly our modules, with our rank and rsLoRA scaling
    assert sorted(theirs.base_model.targeted_module_names) == sorted(get_settings(ours).modules)
    assert theirs.peft_config["default"].use_rslora is True and theirs.peft_config["default"].lora_dropout == 0.1


def test_peft_adapter_loads_in_lorafit(peft, tmp_path):
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "gate_proj", "embed_tokens"],
        init_lora_weights="gaussian",
    )
    theirs = peft.get_peft_model(make_llama(), config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                param.normal_(std=0.2)  # B starts at zero: make the adapter matter
            if name.endswith("embed_tokens.base_layer.weight"):
                param.add_(0.1)  # PEFT saves this table with the adapter and loading it replaces the base's
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(make_llama(), tmp_path / "peft")
    assert len(lora_layers(ours)) == 7 and get_settings(ours).init == "gaussian"
    x = tokens()
    torch.testing.assert_close(ours(x).logits, theirs.eval()(input_ids=x).logits, rtol=0, atol=1e-5)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {n for n, _ in named_lora_parameters(ours)}


def test_peft_regex_and_all_linear_adapters_load(peft, tmp_path):
    for name, targets in [("regex", r".*\.0\.self_attn\.(q|v)_proj"), ("all", "all-linear")]:
        torch.manual_seed(0)
        theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        theirs.save_pretrained(tmp_path / name)
        ours = load_adapter(make_llama(), tmp_path / name)
        assert sorted(get_settings(ours).modules) == sorted(theirs.base_model.targeted_module_names)


def test_saved_files_are_peft_format(tmp_path):
    from safetensors import safe_open

    model = make_llama()
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"
    apply_lora(model, r=4, alpha=8, target_layers=["q_proj", "embed_tokens"], init="gaussian")
    out = save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
    assert config["target_modules"] == ["embed_tokens", "q_proj"]
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    assert config["init_lora_weights"] == "gaussian"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == [
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.embed_tokens.lora_embedding_B",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
        ]
    override = save_adapter(model, tmp_path / "b", base_model_name_or_path="/models/x")
    assert json.loads((override / "adapter_config.json").read_text())["base_model_name_or_path"] == "/models/x"


def test_target_modules_written_so_peft_selects_exactly_ours():
    model = make_llama()
    # leaf names would also hit layer 1: the shortest exact suffix is written instead
    apply_lora(model, r=2, alpha=2, target_layers=[r"re:model\.layers\.0\.self_attn\.q_proj"])
    assert peft_target_modules(model, list(get_settings(model).modules)) == ["0.self_attn.q_proj"]
    # where no suffix separates them, a full-match regex (PEFT's string form)
    outer = nn.ModuleDict(
        {"a": nn.ModuleDict({"b": nn.Linear(2, 2)}), "x": nn.ModuleDict({"a": nn.ModuleDict({"b": nn.Linear(2, 2)})})}
    )
    written = peft_target_modules(outer, ["a.b"])
    assert isinstance(written, str)
    assert [n for n, _ in outer.named_modules() if re.fullmatch(written, n)] == ["a.b"]


def test_adapter_state_dict_from_a_gathered_state_dict(tmp_path):
    model = apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj"])
    randomise_adapters(model)
    full = dict(model.state_dict())
    # activation checkpointing / compile put wrapper segments into names; a tied frozen key rides along
    full = {k.replace("layers.0.", "layers.0._checkpoint_wrapped_module."): v for k, v in full.items()}
    assert "lm_head.weight" in full
    tensors = adapter_state_dict(full)
    assert tensors.keys() == adapter_state_dict(model).keys()
    assert all(torch.equal(tensors[k], v) for k, v in adapter_state_dict(model).items())
    save_adapter(model, tmp_path / "a", state_dict=full)
    # a sharded slice (rank 0's half) must never be written as if it were the adapter
    sliced = dict(full)
    key = "model.layers.1.self_attn.q_proj.lora_B.weight"
    sliced[key] = sliced[key][:16]
    with pytest.raises(ValueError, match=r"wrong shapes: .*q_proj\.lora_B\.weight: \(16, 4\) instead of \(32, 4\)"):
        save_adapter(model, tmp_path / "b", state_dict=sliced)
    assert not (tmp_path / "b").exists()


def test_save_is_atomic_and_never_overwrites_by_accident(tmp_path):
    model = apply_lora(make_llama(), r=2, alpha=2, target_layers=["v_proj"])
    target = tmp_path / "adapter"
    target.mkdir()
    save_adapter(model, target)  # an empty folder is fine
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not empty"):
        save_adapter(model, target)
    assert (target / "notes.txt").exists()
    save_adapter(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folders left behind


def test_round_trip_into_bf16_and_into_an_injected_model(tmp_path):
    source = apply_lora(make_llama(), r=4, alpha=8, target_layers=LLAMA_TARGETS)
    randomise_adapters(source)
    save_adapter(source, tmp_path / "a")
    bf16 = load_adapter(make_llama().to(torch.bfloat16), tmp_path / "a")
    assert {p.dtype for p in lora_parameters(bf16)} == {torch.bfloat16}
    injected = apply_lora(make_llama(), r=4, alpha=8, target_layers=LLAMA_TARGETS)
    load_adapter(injected, tmp_path / "a")
    x = tokens()
    torch.testing.assert_close(injected(x).logits, source(x).logits, rtol=0, atol=0)
    other = apply_lora(make_llama(), r=2, alpha=8, target_layers=["q_proj"])
    with pytest.raises(UserError, match=r"r: model has 2, adapter has 4; modules: model has LoRA on 2"):
        load_adapter(other, tmp_path / "a")


def _write(folder, config, tensors):
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def test_unsupported_adapter_settings_are_refused_together(tmp_path):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    config |= {"lora_bias": True, "rank_pattern": {"q_proj": 8}, "layers_to_transform": [0], "alpha_pattern": {}}
    _write(tmp_path / "a", config, {})
    model = make_llama()
    with pytest.raises(UserError) as info:
        load_adapter(model, tmp_path / "a")
    paths = [p.path.rsplit(": ", 1)[-1] for p in info.value.problems]
    assert paths == ["layers_to_transform", "rank_pattern", "lora_bias"]
    assert str(tmp_path / "a" / "adapter_config.json") in str(info.value)
    assert not has_lora(model)
    with pytest.raises(UserError, match="adapter folder not found"):
        load_adapter(model, tmp_path / "missing")


def test_strict_tensor_loading_names_the_file_and_keys(tmp_path):
    source = apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj"])
    tensors = adapter_state_dict(source)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    dropped = dict(tensors)
    del dropped["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    dropped["base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    _write(tmp_path / "a", config, dropped)
    model = make_llama()
    with pytest.raises(UserError) as info:
        load_adapter(model, tmp_path / "a")
    message = str(info.value)
    assert str(tmp_path / "a" / "adapter_model.safetensors") in message
    assert "missing keys: base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in message
    assert "unexpected keys: base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector" in message
    # the failed load left the model as it was: no LoRA, all parameters trainable again
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    copy_ = copy.deepcopy(tensors)
    copy_["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 3)
    _write(tmp_path / "b", config, copy_)
    with pytest.raises(UserError, match=r"wrong shapes: .*lora_B\.weight: \(32, 3\) instead of \(32, 4\)"):
        load_adapter(make_llama(), tmp_path / "b")
