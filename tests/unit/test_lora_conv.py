"""LoRA on nn.Conv1d / Conv2d / Conv3d against the real `peft`: the same weights give the same outputs, gradients and
merged kernels, adapters load both ways, merging changes nothing, and the convolutions PEFT's adapter does not fit
(grouped, dilated, non-zero padding) are refused by name."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorafit.errors import UserError
from lorafit.lora import (
    adapter_state_dict,
    apply_lora,
    get_settings,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_and_unload,
    named_lora_parameters,
    reset_lora_parameters,
    save_adapter,
)

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class ConvNet(nn.Module):
    """A stem with the given kernel/stride/padding, a 1x1 mixer (PEFT's squeeze path for 2d), a linear head."""

    def __init__(self, dims: int, kernel, stride, padding, bias: bool = True):
        super().__init__()
        conv = CONVS[dims]
        self.stem = conv(3, 6, kernel, stride=stride, padding=padding, bias=bias)
        self.mix = conv(6, 5, 1)
        self.head = nn.Linear(5, 4)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(torch.tanh(self.stem(x)))
        return self.head(h.mean(dim=tuple(range(2, 2 + self.dims))))

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # lorafit's adapters say task_type CAUSAL_LM, so PEFT's from_pretrained wraps the model in its causal-LM
        # class, which takes this method from the model (and is never asked to generate here)
        raise NotImplementedError


CASES = {
    "conv1d-same": (1, 3, 1, "same"),
    "conv1d-stride": (1, 4, 2, 1),
    "conv2d": (2, 3, 1, 1),
    "conv2d-rect-stride": (2, (3, 2), 2, (1, 0)),
    "conv3d": (3, 2, 1, 0),
    "conv3d-mixed": (3, (1, 1, 3), (1, 2, 1), (0, 1, 1)),
}
SPATIAL = {1: (9,), 2: (7, 8), 3: (5, 6, 7)}


def make(case: str) -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(*CASES[case]).eval()


def inputs(case: str, seed: int = 0) -> torch.Tensor:
    dims = CASES[case][0]
    return torch.randn(2, 3, *SPATIAL[dims], generator=torch.Generator().manual_seed(seed))


def randomise(model: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def peft():
    import peft

    return peft


def ours_and_peft(peft, case: str, *, targets=("stem", "mix"), use_rslora=False):
    ours = apply_lora(make(case), r=4, alpha=6, target_layers=list(targets), use_rslora=use_rslora)
    randomise(ours)
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=list(targets), use_rslora=use_rslora)
    theirs = peft.get_peft_model(make(case), config)
    result = peft.set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert not result.unexpected_keys
    params = dict(theirs.named_parameters())
    for name, param in named_lora_parameters(ours):  # PEFT's shapes and names: every tensor arrived
        assert torch.equal(params["base_model.model." + name.removesuffix(".weight") + ".default.weight"], param)
    return ours, theirs


@pytest.mark.parametrize("case", list(CASES))
def test_same_weights_same_outputs_gradients_and_merged_kernels_as_peft(peft, case):
    ours, theirs = ours_and_peft(peft, case, use_rslora=case == "conv2d")
    x = inputs(case)
    ours.train()
    theirs.train()
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=1e-6)
    assert (out_ours - make(case)(x)).abs().max() > 1e-3  # the adapters matter
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    params = dict(theirs.named_parameters())
    names = list(named_lora_parameters(ours))
    assert len(names) == 4
    for name, param in names:
        theirs_grad = params["base_model.model." + name.removesuffix(".weight") + ".default.weight"].grad
        assert param.grad is not None and param.grad.abs().sum() > 0
        torch.testing.assert_close(param.grad, theirs_grad, rtol=1e-5, atol=1e-6)
    # PEFT's merge (get_delta_weight) and ours give the same kernels; merged = unmerged outputs
    before = ours.eval()(x).detach()
    base = make(case)
    merged = merge_and_unload(ours)
    for name in ("stem", "mix"):
        layer = theirs.base_model.model.get_submodule(name)
        if CASES[case][0] == 3 and layer.get_base_layer().weight.shape[2:4] == (1, 1):
            # peft 0.21.2 takes its 2d 1x1 shortcut for a 3d kernel (1, 1, k) and fails: its unmerged forward (compared
            # above) is the reference there
            with pytest.raises(RuntimeError, match="must match the size"):
                layer.get_delta_weight("default")
            continue
        theirs_weight = base.get_submodule(name).weight + layer.get_delta_weight("default").detach()
        torch.testing.assert_close(merged.get_submodule(name).weight, theirs_weight, rtol=0, atol=1e-6)
    assert type(merged.stem) is CONVS[CASES[case][0]] and type(merged.mix) is CONVS[CASES[case][0]]
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["conv1d-stride", "conv2d-rect-stride", "conv3d"])
def test_our_adapter_loads_in_peft_and_theirs_in_ours(peft, tmp_path, case):
    ours = apply_lora(make(case), r=2, alpha=4, target_layers=["stem", "mix"], dropout=0.1, init="gaussian")
    randomise(ours)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(case), tmp_path / "ours").get_base_model().eval()
    x = inputs(case, seed=5)
    torch.testing.assert_close(theirs(x), ours.eval()(x), rtol=0, atol=1e-6)
    assert type(theirs.stem).__name__ == type(make(case).stem).__name__  # PEFT's own conv LoRA layer (lora.ConvNd)
    assert type(theirs.stem).__module__ == "peft.tuners.lora.layer"

    torch.manual_seed(4)
    peft_model = peft.get_peft_model(make(case), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["stem", "mix"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)  # B starts at zero: make the adapter matter
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(make(case), tmp_path / "peft")
    kind = type(make(case).stem).__name__  # Conv1d, Conv2d or Conv3d
    assert {n: layer.base_kind for n, layer in lora_layers(loaded)} == {"stem": kind, "mix": kind}
    torch.testing.assert_close(loaded(x), peft_model.eval()(x), rtol=0, atol=1e-6)
    assert get_settings(loaded).r == 3


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_initialisation_draws_what_peft_draws(peft, init):
    """Same RNG state, same A (kaiming over the fan-in in x kernel, or N(0, 1/r)); B zero: a fresh adapter changes
    nothing."""
    case = "conv2d-rect-stride"
    ours = apply_lora(make(case), r=4, alpha=6, target_layers=["stem"], init=init)
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["stem"], init_lora_weights=True if init == "kaiming" else "gaussian"
    )
    theirs = peft.get_peft_model(make(case), config)
    torch.manual_seed(11)
    ours.stem.reset_lora_parameters()
    torch.manual_seed(11)
    theirs.base_model.model.stem.reset_lora_parameters("default", config.init_lora_weights)
    assert torch.equal(ours.stem.lora_A.weight, theirs.base_model.model.stem.lora_A["default"].weight)
    assert not ours.stem.lora_B.weight.any()
    if init == "kaiming":  # kaiming_uniform(a=sqrt 5): bound 1 / sqrt(fan_in), fan_in = 3 channels x 3 x 2 kernel
        assert ours.stem.lora_A.weight.abs().max() <= 1 / math.sqrt(3 * 3 * 2)
    x = inputs(case)
    torch.testing.assert_close(ours(x), make(case)(x), rtol=0, atol=0)


def test_meta_build_then_seeded_reset_is_the_same_adapter():
    """A run's order: build on meta, inject, load the weights, draw the adapters from the seed."""
    eager = apply_lora(make("conv3d"), r=2, alpha=2, target_layers=["stem", "mix"])
    with torch.device("meta"):
        meta = apply_lora(ConvNet(*CASES["conv3d"]), r=2, alpha=2, target_layers=["stem", "mix"])
    assert all(p.is_meta for p in lora_parameters(meta))
    meta.to_empty(device="cpu")
    meta.load_state_dict(eager.state_dict())
    reset_lora_parameters(meta, seed=3)
    reset_lora_parameters(eager, seed=3)
    for (name, a), (_, b) in zip(named_lora_parameters(meta), named_lora_parameters(eager), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"groups": 3}, "groups=3 (PEFT's adapter on it is an ungrouped convolution, which cannot be merged"),
        ({"dilation": 2}, "dilation=(2, 2) (PEFT's lora_A ignores it"),
        ({"padding_mode": "reflect", "padding": 1}, "padding_mode='reflect' (PEFT's lora_A pads with zeros"),
    ],
    ids=["groups", "dilation", "padding_mode"],
)
def test_convolutions_peft_cannot_adapt_are_refused_by_name(kwargs, said):
    model = nn.Sequential()
    model.add_module("plain", nn.Conv2d(6, 6, 3))
    model.add_module("odd", nn.Conv2d(6, 6, 3, **kwargs))
    with pytest.raises(UserError) as info:
        apply_lora(model, r=3, alpha=2, target_layers=["plain", "re:od."])
    (problem,) = info.value.problems
    assert problem.path == "target_layers[1]"
    assert problem.message.startswith(f"'re:od.' matched odd (Conv2d), which LoRA cannot wrap with {said}")
    assert problem.message.endswith("LoRA on convolutions needs groups=1, dilation=1 and padding_mode='zeros'")
    assert type(model.plain) is nn.Conv2d and type(model.odd) is nn.Conv2d  # nothing changed


def test_conv_targets_are_named_not_swept_in_and_variants_refuse_them():
    # all-linear is PEFT's: linear layers only, never the convolutions
    model = apply_lora(make("conv2d"), r=2, alpha=2, target_layers=["all-linear"])
    assert [n for n, _ in lora_layers(model)] == ["head"]
    with pytest.raises(UserError, match=r"use_dora supports nn.Linear targets only, not stem \(Conv2d\)"):
        apply_lora(make("conv2d"), r=2, alpha=2, target_layers=["stem"], use_dora=True)
    with pytest.raises(UserError, match=r"init pissa supports nn.Linear targets only, not mix \(Conv2d\)"):
        apply_lora(make("conv2d"), r=2, alpha=2, target_layers=["mix"], init="pissa")


def test_conv_adapter_state_names_and_shapes_are_pefts(tmp_path):
    model = apply_lora(make("conv3d-mixed"), r=2, alpha=2, target_layers=["stem"])
    assert {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()} == {
        "base_model.model.stem.lora_A.weight": (2, 3, 1, 1, 3),
        "base_model.model.stem.lora_B.weight": (6, 2, 1, 1, 1),
    }
    # base parameter names unchanged: a base checkpoint loads by its own keys
    assert {"stem.weight", "stem.bias", "mix.weight"} <= set(model.state_dict())
    assert "3, 6, kernel_size=(1, 1, 3), stride=(1, 2, 1), padding=(0, 1, 1), r=2, alpha=2" in repr(model.stem)
