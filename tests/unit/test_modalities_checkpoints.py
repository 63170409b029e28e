"""Modalities checkpoints load into model/checkpointed: wrapper prefixes and Modalities' bare LoRA names are mapped
(and the log says so), and what no mapping covers gets an error that says which mapping is missing."""

import pytest
import torch

from lorafit.errors import UserError
from lorafit.lora import apply_lora
from lorafit.models.checkpointed import TorchCheckpointLoader
from tiny import make_llama


def _modalities_names(state: dict, prefix: str = "huggingface_model.") -> dict:
    """model.state_dict() as Modalities' HuggingFacePretrainedModel + LoRALinear name it."""
    out = {}
    for key, value in state.items():
        key = key.replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
        out[prefix + key] = value.clone()
    return out


def test_wrapper_prefix_is_stripped_and_said(tmp_path, capsys):
    source = make_llama(seed=1)
    path = tmp_path / "model.bin"
    torch.save(_modalities_names(source.state_dict()), path)
    target = make_llama(seed=2)
    TorchCheckpointLoader(device="cpu").load(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert "removed the wrapper prefix 'huggingface_model.'" in capsys.readouterr().out


def test_modalities_lora_checkpoint_loads_into_a_lora_model(tmp_path, capsys):
    source = apply_lora(make_llama(seed=1), r=2, alpha=4, target_layers=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "lora_" in name:
                p.normal_()
    state = _modalities_names(source.state_dict())
    state = {k.replace("model.layers.0.", "model.layers.0._fsdp_wrapped_module."): v for k, v in state.items()}
    assert "huggingface_model.model.layers.1.self_attn.q_proj.lora_A" in state
    path = tmp_path / "lora.bin"
    torch.save(state, path)
    target = apply_lora(make_llama(seed=2), r=2, alpha=4, target_layers=["q_proj", "v_proj"])
    TorchCheckpointLoader(device="cpu").load(target, path)
    x = torch.randint(0, 300, (1, 12))
    assert torch.equal(target(x).logits, source(x).logits)
    out = capsys.readouterr().out
    assert "renamed 8 Modalities LoRA parameters" in out and "_fsdp_wrapped_module." in out


def test_lora_checkpoint_into_a_model_without_lora_says_which_mapping_is_missing(tmp_path):
    source = apply_lora(make_llama(seed=1), r=2, alpha=4, target_layers=["q_proj"])
    path = tmp_path / "lora.bin"
    torch.save(_modalities_names(source.state_dict()), path)
    with pytest.raises(UserError, match=r"holds LoRA adapters \(4 tensors.*has no LoRA layers: wrap a model/lora"):
        TorchCheckpointLoader(device="cpu").load(make_llama(seed=2), path)
    other = apply_lora(make_llama(seed=2), r=2, alpha=4, target_layers=["k_proj"])
    with pytest.raises(UserError, match=r"No LoRA layer of this model matches .* target_layers"):
        TorchCheckpointLoader(device="cpu").load(other, path)


def test_an_unknown_prefix_still_gets_the_full_key_report(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({"encoder." + k: v for k, v in make_llama().state_dict().items()}, path)
    with pytest.raises(UserError, match="missing .* unexpected"):
        TorchCheckpointLoader(device="cpu").load(make_llama(), path)


def test_a_run_starts_from_the_adapters_its_checkpointed_lora_model_loads(tmp_path, tiny_model_dir):
    """model/checkpointed around model/lora (Modalities' way to continue from a LoRA checkpoint): the run's
    adapters are the file's A and B, not the seeded fresh draw that a run without them starts from."""
    import yaml
    from transformers import AutoModelForCausalLM

    from lorafit.lora import lora_layers
    from lorafit.run.build import build_run, load_run_config
    from tiny_runs import tiny_run_config

    config = tiny_run_config(tiny_model_dir, cache_path=tmp_path / "cache", shared_base=False)
    lora = config["model"]
    source = apply_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=4, alpha=8, target_layers=["q_proj", "v_proj"]
    )
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "lora_" in name:
                p.normal_()
    torch.save(_modalities_names(source.state_dict()), tmp_path / "lora.bin")
    loading = {"component_key": "checkpoint_loading", "variant_key": "torch", "config": {"device": "cpu"}}
    config["model"] = {
        "component_key": "model",
        "variant_key": "checkpointed",
        "config": {"checkpoint_loading": loading, "checkpoint_path": str(tmp_path / "lora.bin"), "model": lora},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    _config, graph = load_run_config(tmp_path / "run.yaml")
    model = build_run(graph).model
    expected = dict(lora_layers(source))
    for name, layer in lora_layers(model):
        for ours, theirs in zip(layer.lora_factors(), expected[name].lora_factors(), strict=True):
            assert torch.equal(ours, theirs), name
    x = torch.randint(0, 300, (1, 12))
    assert torch.equal(model(x).logits, source(x).logits)
