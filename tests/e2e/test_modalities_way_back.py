"""The way back, checked by Modalities' own code: modalities 0.5.0 (its venv, tests/modalities_ref/reference.py)
builds the seed config's `checkpointed_model` (model/checkpointed, checkpoint_loading/torch: a strict
load_state_dict into its `huggingface_pretrained_model`) and runs its forward on a batch:

- the base `model.bin` that `lorafit models prepare` writes (here from the tiny Llama instead of the GGUF) loads,
  holding exactly the model's tensors, with the model's logits;
- `lorafit export modalities --form merged` of a trained run loads, holding exactly lorafit's merged tensors, with
  the logits of lorafit's model;
- `--form lora`: the `lora` and `lora_2` branches' LoRA code (vendored) converts 0.5.0's Hugging Face model and
  0.5.0's torch checkpoint loading loads the file strictly: the logits of lorafit's LoRA model, apart and merged.

Logits are compared to 1e-5 (Modalities' venv has transformers 4.x, lorafit's 5.x); the tensors exactly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from cli_run import lorafit
from modalities_ref import modalities_venv_python, reference

REPO = Path(__file__).resolve().parents[2]
SEED_CONFIG = REPO / "tests" / "fixtures" / "modalities" / "config_lorem_ipsum_lora.yaml"
IDS = [[1, 20, 30, 40, 50, 2, 7, 9], [3, 11, 200, 17, 5, 250, 99, 4]]
R, ALPHA, TARGETS = 2, 4, ("q_proj", "k_proj", "v_proj", "o_proj")

pytestmark = pytest.mark.modalities


@pytest.fixture(scope="module")
def modalities_python() -> str:
    return modalities_venv_python()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    import lorafit
    from tiny_runs import tiny_run_config

    tmp = tmp_path_factory.mktemp("way_back")
    config = tiny_run_config(tiny_model_dir, cache_path=tmp / "cache", steps=2, r=R, alpha=ALPHA, targets=TARGETS)
    return lorafit.train(config, experiments_root_path=tmp / "runs", experiment_id="tiny")


def seed_config(folder: Path, model_name: Path, checkpoint: Path | None) -> Path:
    """The seed config's two model blocks with its paths changed, the device (no GPU here), and two names as 0.5.0
    spells them: the component `model/fsdp1_checkpointed` (the lora branch's `model/checkpointed`, the same
    ModelFactory function: the checkpoint loading's load_model_checkpoint) and the precision FP32 (FP_32)."""
    seed = yaml.safe_load(SEED_CONFIG.read_text())
    config = {"huggingface_smol_llm_model": seed["huggingface_smol_llm_model"]}
    config["huggingface_smol_llm_model"]["config"]["model_name"] = str(model_name)
    if checkpoint is not None:
        config["checkpointed_model"] = seed["checkpointed_model"]
        assert config["checkpointed_model"]["variant_key"] == "checkpointed"
        config["checkpointed_model"]["variant_key"] = "fsdp1_checkpointed"
        config["checkpointed_model"]["config"]["checkpoint_path"] = str(checkpoint)
        config["checkpointed_model"]["config"]["checkpoint_loading"]["config"].update(device="cpu", precision="FP32")
    path = folder / "modalities.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def digests(state: dict) -> dict:
    return {k: hashlib.sha256(v.detach().float().contiguous().numpy().tobytes()).hexdigest() for k, v in state.items()}


def our_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def export(run: Path, output: Path, form: str) -> Path:
    done = lorafit("export", "modalities", "--run", str(run), "--output", str(output), "--form", form)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = output.iterdir()
    assert path.name == "eid_tiny-model-num_steps_2-num_tokens_256.bin"
    return path


def test_modalities_loads_the_prepared_base_model_bin(modalities_python, tmp_path, monkeypatch):
    import lorafit.models.smollm2 as smollm2
    from tiny import make_llama, make_tokenizer

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "Tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(smollm2, "find_gguf", lambda: tmp_path / "pkg" / "Tiny.gguf")
    monkeypatch.setattr(smollm2, "_read_gguf", lambda path, say: (make_llama(seed=3), make_tokenizer()))
    folder = smollm2.prepare_smollm2(tmp_path / "models", progress=False)
    config = seed_config(tmp_path, folder, tmp_path / "models" / smollm2.SAVED_DIR / "model.bin")

    theirs = reference(
        modalities_python, {"op": "logits", "config": str(config), "model": "checkpointed_model", "input_ids": IDS}
    )
    model = make_llama(seed=3)
    assert theirs["sha256"] == digests({"huggingface_model." + k: v for k, v in model.state_dict().items()})
    torch.testing.assert_close(torch.tensor(theirs["logits"]), our_logits(model), rtol=0, atol=1e-5)


def test_modalities_loads_the_merged_export(modalities_python, trained_run, tiny_model_dir, tmp_path):
    from lorafit.lora import merge_and_unload
    from lorafit.outputs.trained_run import find_trained_run, load_trained_model

    path = export(trained_run, tmp_path / "out", "merged")
    model = load_trained_model(find_trained_run(trained_run))
    expected = our_logits(model)
    merged = merge_and_unload(model)
    theirs = reference(
        modalities_python,
        {
            "op": "logits",
            "config": str(seed_config(tmp_path, tiny_model_dir, path)),
            "model": "checkpointed_model",
            "input_ids": IDS,
        },
    )
    assert theirs["sha256"] == digests({"huggingface_model." + k: v for k, v in merged.state_dict().items()})
    torch.testing.assert_close(torch.tensor(theirs["logits"]), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("branch", ["lora", "lora_2"])
def test_the_lora_branches_load_the_lora_export(modalities_python, trained_run, tiny_model_dir, tmp_path, branch):
    from lorafit.outputs.trained_run import find_trained_run, load_trained_model

    path = export(trained_run, tmp_path / "out", "lora")
    expected = our_logits(load_trained_model(find_trained_run(trained_run)))
    lora = {"branch": branch, "r": R, "alpha": ALPHA, "target_layers": list(TARGETS), "checkpoint": str(path)}
    config = seed_config(tmp_path, tiny_model_dir, None)
    theirs = reference(
        modalities_python,
        {"op": "logits", "config": str(config), "model": "huggingface_smol_llm_model", "input_ids": IDS, "lora": lora},
    )
    assert theirs["sha256"] == digests(torch.load(path, weights_only=True))  # every tensor of the file, as it is
    torch.testing.assert_close(torch.tensor(theirs["logits"]), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(theirs["merged_logits"]), expected, rtol=0, atol=1e-5)
