"""Weight files and checkpoint loading: every file variant gives the same logits, precision and device rules, tied
embeddings, refused pickles, and errors that name the file, the config key and the tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorafit.models.checkpointed as checkpointed
from lorafit.config.context import build_context
from lorafit.config.graph import ConfigGraph
from lorafit.errors import UserError
from lorafit.models.checkpointed import TorchCheckpointLoader
from lorafit.models.deferred import deferred_init, is_pending
from lorafit.models.huggingface import load_hf_config, model_from_config
from lorafit.models.weights import load_into, load_state_dict_file
from tiny import LLAMA, make_llama
from tiny_runs import checkpointed_model

TINY_LLAMA = dict(LLAMA)  # tests/support/tiny.py's Llama, written out as a YAML author would
IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.fixture(scope="module")
def reference():
    """The tiny Llama that `tiny_model_dir` holds (same seed), and its logits."""
    model = make_llama(seed=0)
    return model, logits(model)


@pytest.fixture(scope="module")
def files(tmp_path_factory, reference) -> dict[str, Path]:
    """The reference weights as model.bin (both tied keys), .pt, and .safetensors (tied key once, as HF saves)."""
    model, _ = reference
    folder = tmp_path_factory.mktemp("weights")
    state = model.state_dict()
    torch.save(state, folder / "model.bin")
    torch.save({"state_dict": state}, folder / "wrapped.pt")
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, folder / "model.safetensors")
    return {"bin": folder / "model.bin", "pt": folder / "wrapped.pt", "safetensors": folder / "model.safetensors"}


def seed_config(checkpoint_path, model_config: dict, device="cpu", precision="FP_32") -> dict:
    """The seed's shape: a from-config model, wrapped by `checkpointed` with `checkpoint_loading: torch`."""
    return {
        "hf_model": {"component_key": "model", "variant_key": "huggingface_from_config", "config": model_config},
        "checkpointed_model": checkpointed_model("hf_model", checkpoint_path, device=device, precision=precision),
    }


def build(config: dict, name: str = "checkpointed_model"):
    import lorafit.models.checkpointed
    import lorafit.models.huggingface  # noqa: F401 - registers the components

    graph = ConfigGraph(config)
    assert graph.check() == []
    with deferred_init():
        return graph.build(name)


def assert_tied(model) -> None:
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ----------------------------------------------------------------------------------- every variant, same logits
@pytest.mark.parametrize("variant", ["bin", "pt", "safetensors", "folder"])
def test_checkpoint_variants_give_the_reference_logits(variant, files, tiny_model_dir, reference):
    path = tiny_model_dir if variant == "folder" else files[variant]
    model = build(seed_config(path, {"config_path": str(tiny_model_dir)}))
    assert torch.equal(logits(model), reference[1])
    assert_tied(model)
    assert not is_pending(model)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())


def test_pretrained_folder_and_inline_config_give_the_reference_logits(files, tiny_model_dir, reference):
    import lorafit.models.huggingface  # noqa: F401

    pretrained = ConfigGraph(
        {
            "m": {
                "component_key": "model",
                "variant_key": "huggingface_pretrained_model",
                "config": {"model_name_or_path": str(tiny_model_dir)},
            }
        }
    ).build("m")
    assert torch.equal(logits(pretrained), reference[1])
    assert_tied(pretrained)
    inline = {"model_type": "llama", "config_overrides": TINY_LLAMA}
    model = build(seed_config(files["bin"], inline))
    assert torch.equal(logits(model), reference[1])


def test_meta_build_then_checkpoint_load(files, tiny_model_dir, reference):
    with build_context(meta_device=True):
        model = model_from_config(load_hf_config(tiny_model_dir))
    assert all(p.is_meta for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.is_meta
    TorchCheckpointLoader(device="cpu").load(model, files["safetensors"])
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert_tied(model)
    assert torch.equal(logits(model), reference[1])  # the rotary buffers were recomputed, not left as garbage


def test_loading_into_an_initialised_model_copies_and_keeps_its_ties(files, reference):
    model = make_llama(seed=1)
    embed = model.model.embed_tokens.weight
    load_into(model, load_state_dict_file(files["safetensors"]))
    assert model.model.embed_tokens.weight is embed  # copied in place: optimizers holding it stay valid
    assert_tied(model)
    assert torch.equal(logits(model), reference[1])


# ----------------------------------------------------------------------------------- precision
@pytest.mark.parametrize(
    ("precision", "dtype"), [("BF_16", torch.bfloat16), ("FP16", torch.float16), ("fp32", torch.float32)]
)
def test_precision_casts_the_model(precision, dtype, files, tiny_model_dir, reference):
    model = build(seed_config(files["bin"], {"config_path": str(tiny_model_dir)}, precision=precision))
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert_tied(model)
    expected = reference[0].model.layers[0].mlp.up_proj.weight.to(dtype)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, expected)
    if dtype == torch.bfloat16:  # and it still computes the same function, to bf16 accuracy
        torch.testing.assert_close(logits(model).float(), reference[1], atol=0.05, rtol=0.05)


def test_a_bf16_file_loads_into_fp32_when_asked(tmp_path, tiny_model_dir, reference):
    state = {k: v.to(torch.bfloat16) for k, v in reference[0].state_dict().items()}
    torch.save(state, tmp_path / "bf16.bin")
    model = build(seed_config(tmp_path / "bf16.bin", {"config_path": str(tiny_model_dir)}, precision="FP_32"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"].float())


def test_precision_and_device_values_are_checked():
    import lorafit.models.checkpointed  # noqa: F401

    def problems(**config):
        comp = {"component_key": "checkpoint_loading", "variant_key": "torch", "config": config}
        return {p.path: p.message for p in ConfigGraph({"loader": comp}).check()}

    assert problems(device=0, precision="FP_32") == problems(device="auto", precision="bf16") == {}
    assert "valid: fp32, bf16, fp16" in problems(precision="FP_8")["loader.config.precision"]
    assert "valid: a GPU index" in problems(device="gpu")["loader.config.device"]
    assert ">= 0" in problems(device=-1)["loader.config.device"]
    loader = ConfigGraph(
        {
            "l": {
                "component_key": "checkpoint_loading",
                "variant_key": "torch",
                "config": {"device": "1", "precision": "BF16"},
            }
        }
    ).build("l")
    assert loader == TorchCheckpointLoader(device=1, precision="bf16")  # "${cuda_env:LOCAL_RANK}" arrives as text


# ----------------------------------------------------------------------------------- device rules
def test_device_rules_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(checkpointed, "_warned_no_cuda", False)
    warnings: list[str] = []
    monkeypatch.setattr(checkpointed, "warn", warnings.append)
    assert TorchCheckpointLoader(device="cpu").resolve_device() == torch.device("cpu")
    assert TorchCheckpointLoader(device="auto").resolve_device() == torch.device("cpu")
    assert warnings == []
    for _ in range(3):  # the seed's `device: 0` runs anywhere, with one warning per process
        assert TorchCheckpointLoader(device=0).resolve_device() == torch.device("cpu")
    assert len(warnings) == 1 and "no CUDA device" in warnings[0]
    with pytest.raises(UserError, match="no CUDA device") as info:
        TorchCheckpointLoader(device="cuda").resolve_device()
    assert info.value.problems[0].path == "device"


def test_device_rules_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert TorchCheckpointLoader(device=2).resolve_device() == torch.device("cuda", 2)
    assert TorchCheckpointLoader(device="auto").resolve_device() == torch.device("cuda", 0)
    assert TorchCheckpointLoader(device="cpu").resolve_device() == torch.device("cpu")
    with pytest.raises(UserError, match="GPU 7 does not exist: this machine has 4"):
        TorchCheckpointLoader(device=7).resolve_device()
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun: this rank's GPU, whatever index the config names
    for device in (0, "cuda", "auto"):
        assert TorchCheckpointLoader(device=device).resolve_device() == torch.device("cuda", 3)


# ----------------------------------------------------------------------------------- deferred random init
def test_from_config_outside_a_build_is_randomly_initialised(tiny_model_dir):
    model = model_from_config(load_hf_config(tiny_model_dir))
    assert not is_pending(model)
    assert_tied(model)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert torch.isfinite(weight).all() and 0.015 < weight.std().item() < 0.025  # initializer_range 0.02
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert torch.isfinite(logits(model)).all()


def test_checkpointed_model_is_never_randomly_initialised(monkeypatch, files, tiny_model_dir, reference):
    import lorafit.models.deferred as deferred

    calls = []
    monkeypatch.setattr(deferred, "initialize", lambda model: calls.append(model))
    model = build(seed_config(files["bin"], {"config_path": str(tiny_model_dir)}))
    assert calls == []
    assert torch.equal(logits(model), reference[1])


def test_a_model_nothing_loads_into_is_initialised_when_the_build_ends(tiny_model_dir):
    with deferred_init():
        model = model_from_config(load_hf_config(tiny_model_dir))
        assert is_pending(model)
    assert not is_pending(model)
    assert 0.015 < model.model.layers[1].mlp.down_proj.weight.std().item() < 0.025
    assert_tied(model)
    assert torch.isfinite(logits(model)).all()


# ----------------------------------------------------------------------------------- refused and broken files
class RunsCode:
    """Unpickling this calls exec(): what weights_only loading must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_a_pickle_that_would_run_code_is_refused(container, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "model.bin"
    if container == "torch.save":
        torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": RunsCode(marker)}, path)
    else:  # a bare pickle (torch.load's legacy format), protocol 2 as torch writes
        path.write_bytes(pickle.dumps({"evil": RunsCode(marker)}, protocol=2))
    with pytest.raises(UserError, match=r"refused to load .*model\.bin.*would run pickled code") as info:
        load_state_dict_file(path, field="checkpoint_path")
    assert "Unsupported global: GLOBAL" in str(info.value) and "exec" in str(info.value)
    assert info.value.problems[0].path == "checkpoint_path"
    assert not marker.exists()


def test_broken_files_are_user_errors_naming_the_file(tmp_path, files):
    cases = {
        "truncated.safetensors": files["safetensors"].read_bytes()[:1000],
        "truncated.bin": files["bin"].read_bytes()[: files["bin"].stat().st_size // 2],
        "garbage.pt": b"this is not a checkpoint" * 10,
        "empty.bin": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match="truncated or corrupt|empty") as info:
            load_state_dict_file(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(UserError, match="weights file not found: .*nope.bin"):
        load_state_dict_file(tmp_path / "nope.bin")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="holds a Tensor, expected a state dict"):
        load_state_dict_file(tmp_path / "tensor.pt")
    torch.save({"w": torch.zeros(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(UserError, match="not a plain state dict: step hold no tensor"):
        load_state_dict_file(tmp_path / "mixed.pt")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(UserError, match="no weights in the folder .*empty_folder"):
        load_state_dict_file(tmp_path / "empty_folder")


# ----------------------------------------------------------------------------------- key and shape errors
def test_missing_and_unexpected_keys_are_named(reference):
    state = dict(reference[0].state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.9.extra.weight"] = torch.zeros(2)
    with pytest.raises(UserError) as info:
        load_into(make_llama(), state, source="ckpt.bin")
    message = str(info.value)
    assert "ckpt.bin does not fit the model (LlamaForCausalLM)" in message
    assert "1 missing (in the model, not in the file): model.layers.1.mlp.up_proj.weight" in message
    assert "1 unexpected (in the file, not in the model): model.layers.9.extra.weight" in message


def test_shape_mismatch_names_the_tensor_and_both_shapes(reference):
    state = dict(reference[0].state_dict())
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    with pytest.raises(
        UserError,
        match=r"model\.layers\.0\.self_attn\.q_proj\.weight: file \(16, 32\) vs model "
        r"\(32, 32\)",
    ):
        load_into(make_llama(), state)


def test_wrapped_prefix_and_untied_values_are_explained(reference):
    state = {f"module.{k}": v for k, v in reference[0].state_dict().items()}
    with pytest.raises(UserError, match="start with 'module.'.*strip that prefix"):
        load_into(make_llama(), state)
    state = dict(reference[0].state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(UserError, match="ties model.embed_tokens.weight and lm_head.weight"):
        load_into(make_llama(), state)


def test_checkpointed_errors_carry_the_config_path(tmp_path, tiny_model_dir, reference):
    state = dict(reference[0].state_dict())
    del state["model.norm.weight"]
    torch.save(state, tmp_path / "partial.bin")
    with pytest.raises(UserError) as info:
        build(seed_config(tmp_path / "partial.bin", {"config_path": str(tiny_model_dir)}))
    assert info.value.problems[0].path == "checkpointed_model.config.checkpoint_path"
    assert "missing (in the model, not in the file): model.norm.weight" in str(info.value)
    with pytest.raises(UserError, match=r"checkpointed_model\.config\.checkpoint_path: weights file not found"):
        build(seed_config(tmp_path / "missing.bin", {"config_path": str(tiny_model_dir)}))


def test_validate_checks_the_file_but_loads_nothing(tmp_path, tiny_model_dir, files):
    config = seed_config(files["bin"], {"config_path": str(tiny_model_dir)}, device=0)
    with build_context(meta_device=True, load_weights=False):
        model = build(config)
        assert all(p.is_meta for p in model.parameters())
        with pytest.raises(UserError, match=r"checkpointed_model\.config\.checkpoint_path: weights file not found"):
            build(seed_config(tmp_path / "missing.bin", {"config_path": str(tiny_model_dir)}))
