"""`embedding_init`: an embedding adapter starts as PEFT's (A = 0, B ~ N(0, 1)) or as the Modalities lora branches'
LoRAEmbedding (A ~ N(0, 1), B = 0); a Modalities config gets the latter, the file stays PEFT's either way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lorafit.errors import UserError
from lorafit.lora import apply_lora, describe_lora, lora_layers, reset_lora_parameters, save_adapter
from lorafit.lora.embedding import LoraEmbedding
from tiny import make_llama

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / "configs" / "modalities" / "config_lorem_ipsum_lora.yaml"


def embedding(init: str, seed: int | None = None) -> LoraEmbedding:
    model = nn.ModuleDict({"table": nn.Embedding(4000, 64)})
    apply_lora(model, r=8, alpha=8, target_layers=["table"], embedding_init=init, seed=seed)
    return model["table"]


def test_the_two_initialisations_draw_what_they_say():
    peft, modalities = embedding("peft", seed=0), embedding("modalities", seed=0)
    # PEFT: A zero, B standard normal (64 x 8 values); Modalities: A standard normal (8 x 4000 values), B zero
    assert not peft.lora_embedding_A.any()
    b = peft.lora_embedding_B.detach()
    assert abs(b.mean()) < 0.15 and abs(b.std() - 1) < 0.1
    a = modalities.lora_embedding_A.detach()
    assert abs(a.mean()) < 0.03 and abs(a.std() - 1) < 0.03 and not modalities.lora_embedding_B.any()
    assert a.abs().max() > 3  # a normal draw, not a bounded uniform one
    # both start at zero: the layer computes what the table did
    ids = torch.randint(0, 4000, (3, 9))
    for layer in (peft, modalities):
        assert torch.equal(layer(ids), nn.functional.embedding(ids, layer.weight))
    # the seeded reset (a run's draw after loading weights) honours it too, reproducibly
    again = embedding("modalities", seed=0)
    reset_lora_parameters(nn.ModuleDict({"table": again}), seed=0)
    assert torch.equal(again.lora_embedding_A, modalities.lora_embedding_A) and not again.lora_embedding_B.any()
    assert "embedding_init=modalities" in repr(modalities) and "embedding_init" not in repr(peft)


def test_first_gradient_reaches_the_zero_factor_and_the_flow_check_knows_which():
    from lorafit.distributed.env import init_distributed
    from lorafit.training.checks import check_gradient_flow

    env = init_distributed()
    x = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    for init, zero, random in [
        ("peft", "lora_embedding_A", "lora_embedding_B"),
        ("modalities", "lora_embedding_B", "lora_embedding_A"),
    ]:
        model = apply_lora(
            make_llama(),
            r=4,
            alpha=8,
            target_layers=["q_proj", "embed_tokens"],
            embedding_init=init,
            seed=1,
            warn_save_pretrained=False,
        )
        model(x, labels=x).loss.backward()
        layer = model.model.embed_tokens
        assert getattr(layer, zero).grad.abs().sum() > 0
        assert not getattr(layer, random).grad.any()  # its gradient goes through the zero factor
        assert layer.zero_factor_suffix == zero
        check_gradient_flow(model, 1, env)  # step 1 checks the factor that started at zero: no false alarm


def test_a_modalities_initialised_adapter_is_a_peft_adapter(tmp_path):
    import json

    import peft

    ours = apply_lora(
        make_llama(),
        r=4,
        alpha=8,
        target_layers=["q_proj", "embed_tokens"],
        embedding_init="modalities",
        warn_save_pretrained=False,
    )
    with torch.no_grad():
        ours.model.embed_tokens.lora_embedding_B.normal_(std=0.2)  # trained: B no longer zero
    save_adapter(ours, tmp_path / "a")
    assert "embedding_init" not in json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    theirs = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "a").eval()
    x = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(theirs(input_ids=x).logits, ours.eval()(x).logits, rtol=0, atol=1e-5)


def test_an_unknown_embedding_init_is_refused():
    with pytest.raises(UserError) as info:
        apply_lora(make_llama(), r=2, alpha=2, target_layers=["embed_tokens"], embedding_init="normal")
    assert [(p.path, p.message) for p in info.value.problems] == [
        ("embedding_init", "must be one of peft, modalities, got 'normal'")
    ]


def test_a_modalities_config_gets_the_modalities_init_and_a_lorafit_config_keeps_pefts(
    tmp_path, monkeypatch, tiny_model_dir, smollm2_dir
):
    """The shared Modalities config (its model folder: the prepared SmolLM2-135M, built on meta) and a lorafit one."""
    import yaml

    from lorafit.config.context import build_context
    from lorafit.run.build import build_run, load_run_config
    from tiny_runs import tiny_run_config

    for name, value in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(REPO)
    overrides = (
        "settings.training.sequence_length=128",
        "lora_model.config.target_layers=[q_proj,embed_tokens]",
        "evaluation_subscriber.config.mode=OFFLINE",
    )
    for extra, expected in [((), "modalities"), (("lora_model.config.embedding_init=peft",), "peft")]:
        _config, graph = load_run_config(SHARED, overrides=(*overrides, *extra))
        with build_context(meta_device=True, load_weights=False):
            model = build_run(graph).model
        kinds = {type(layer).__name__ for _, layer in lora_layers(model)}
        assert kinds == {"LoraLinear", "LoraEmbedding"}
        assert {layer.embedding_init for _, layer in lora_layers(model) if isinstance(layer, LoraEmbedding)} == {
            expected
        }
        assert f"init=kaiming embedding_init={expected}: 31 modules" in describe_lora(model, verbose=False)

    config = tiny_run_config(tiny_model_dir, cache_path=tmp_path / "cache", targets=("q_proj", "embed_tokens"))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    _config, graph = load_run_config(tmp_path / "run.yaml")
    model = build_run(graph).model
    (layer,) = [layer for _, layer in lora_layers(model) if isinstance(layer, LoraEmbedding)]
    assert layer.embedding_init == "peft" and not layer.lora_embedding_A.any()
