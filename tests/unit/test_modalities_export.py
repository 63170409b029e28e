"""The two forms of `lorafit export modalities` (lorafit/modalities/export.py) on in-memory models: their names
and values, what the `lora` form refuses (the branches' model/lora cannot say it), and the file write. That
Modalities' own code loads them: tests/unit/test_modalities_lora_branch.py (the branches' LoRA code) and
tests/e2e/test_modalities_fidelity.py (modalities 0.5.0)."""

from __future__ import annotations

import pytest
import torch

from lorafit.errors import UserError
from lorafit.lora import apply_lora, lora_layers
from lorafit.modalities.export import checkpoint_name, lora_state_dict, merged_state_dict, write_checkpoint
from tiny import make_llama


def _trained(**options):
    model = make_llama(seed=1)
    apply_lora(
        model, warn_save_pretrained=False, **{"r": 4, "alpha": 8, "target_layers": ["q_proj", "v_proj"], **options}
    )
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for factor in layer.lora_factors():
                factor.normal_()
    return model


def test_the_merged_form_is_the_plain_model_with_the_delta_folded_in_under_modalities_names():
    model = _trained()
    layer = dict(lora_layers(model))["model.layers.1.self_attn.v_proj"]
    a, b = layer.lora_factors()
    expected = layer.weight.detach() + (8 / 4) * (b.detach() @ a.detach())
    x = torch.randint(0, 300, (1, 7))
    logits = model(x).logits
    state = merged_state_dict(model)
    assert set(state) == {"huggingface_model." + k for k in make_llama().state_dict()}
    torch.testing.assert_close(state["huggingface_model.model.layers.1.self_attn.v_proj.weight"], expected)
    plain = make_llama(seed=9)
    plain.load_state_dict({k.removeprefix("huggingface_model."): v for k, v in state.items()}, strict=True)
    torch.testing.assert_close(plain(x).logits, logits, rtol=0, atol=1e-5)


def test_the_lora_form_names_the_adapters_as_the_branches_layers_do():
    state, spec = lora_state_dict(_trained())
    assert "huggingface_model.model.layers.0.self_attn.q_proj.lora_A" in state
    assert "huggingface_model.model.layers.0.self_attn.q_proj.weight" in state
    assert not any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert state["huggingface_model.model.layers.0.self_attn.q_proj.lora_B"].shape == (32, 4)
    assert (spec.r, spec.alpha, spec.target_layers) == (4, 8, ["q_proj", "v_proj"])
    assert "    r: 4\n    target_layers:\n      - q_proj\n      - v_proj\n" in spec.yaml()


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"use_rslora": True}, "rsLoRA scaling"),
        ({"use_dora": True}, "DoRA"),
        ({"alpha": 2.5}, "alpha 2.5"),
        (
            {"target_layers": ["re:model\\.layers\\.0\\.self_attn\\.q_proj"]},
            "left 1 such modules without LoRA (e.g. model.layers.1.self_attn.q_proj)",
        ),
    ],
)
def test_what_the_branches_model_lora_cannot_say_is_refused_with_the_way_out(options, said):
    with pytest.raises(UserError, match="the `lora` form cannot hold") as error:
        lora_state_dict(_trained(**options))
    assert said in str(error.value) and "--form merged" in str(error.value)


def test_a_model_without_lora_has_only_the_merged_form():
    with pytest.raises(UserError, match="no LoRA adapters .* --form merged"):
        lora_state_dict(make_llama())
    assert "huggingface_model.lm_head.weight" in merged_state_dict(make_llama())


def test_the_file_is_written_atomically_and_never_replaced(tmp_path):
    name = checkpoint_name("run-1", 12, 3072)
    assert name == "eid_run-1-model-num_steps_12-num_tokens_3072.bin"
    state = {"huggingface_model.x": torch.ones(2)}
    path = write_checkpoint(state, tmp_path / "out", name)
    assert torch.equal(torch.load(path, weights_only=True)["huggingface_model.x"], torch.ones(2))
    before = path.read_bytes()
    with pytest.raises(UserError, match="exists; lorafit never replaces a checkpoint"):
        write_checkpoint({"huggingface_model.x": torch.zeros(2)}, tmp_path / "out", name)
    assert path.read_bytes() == before and sorted(p.name for p in (tmp_path / "out").iterdir()) == [name]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        write_checkpoint(state, tmp_path / "file", name)
