"""Modalities' components with Modalities' meaning: the loss mask, the continuous dataset, and the steps, global batch
and intervals of the shared config, each computed here independently and compared."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lorafit.data.pbin import read_pbin
from lorafit.errors import UserError
from lorafit.modalities.data import GPT2Collator, PackedContinuousDataset, mask_targets

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / "configs" / "modalities" / "config_lorem_ipsum_lora.yaml"
B, E = 1, 2  # <|im_start|>, <|im_end|> in SmolLM2's vocabulary


def reference_mask(row: list[int]) -> list[bool]:
    """Modalities' rule read as a loop: a target is trained iff it lies strictly after a begin marker and before the
    next end marker."""
    inside, out = False, []
    for token in row:
        if token == E:
            inside = False
            out.append(False)
        else:
            out.append(inside)
            if token == B:
                inside = True
    out = [keep and token != B for keep, token in zip(out, row, strict=True)]
    return out


def test_mask_matches_modalities_docstring_example_and_the_loop():
    # Modalities' own example (b=3, e=4): target [2,3,2,2,4,2,2,2] keeps positions 2 and 3
    masked = mask_targets(torch.tensor([[2, 3, 2, 2, 4, 2, 2, 2]]), 3, 4)
    assert masked.tolist() == [[-100, -100, 2, 2, -100, -100, -100, -100]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        row = []
        for _ in range(rng.integers(1, 4)):
            row += [*rng.integers(5, 9, size=rng.integers(0, 4)).tolist(), B]
            row += [*rng.integers(5, 9, size=rng.integers(0, 4)).tolist(), E]
        row += rng.integers(5, 9, size=rng.integers(0, 3)).tolist()
        got = mask_targets(torch.tensor([row]), B, E)[0]
        assert (got != -100).tolist() == reference_mask(row), row


def test_mask_errors_as_modalities():
    with pytest.raises(UserError, match="b_mask_token_id not found in target"):
        mask_targets(torch.tensor([[5, 6, E]]), B, E)
    with pytest.raises(UserError, match="e_mask_token_id not found in target"):
        mask_targets(torch.tensor([[5, B, 6]]), B, E)
    with pytest.raises(UserError, match="end mask token indicator is before begin"):
        mask_targets(torch.tensor([[5, E, 6, B, 7]]), B, E)


def test_continuous_dataset_blocks_as_modalities(tmp_path):
    from modalities.dataloader.dataset import PackedMemMapDatasetContinuous

    path = REPO / "data/modalities/chat_val.pbin"
    for reuse in (True, False):
        ours = PackedContinuousDataset(path, 128, "input_ids", reuse)
        theirs = PackedMemMapDatasetContinuous(path, sample_key="input_ids", block_size=129, reuse_last_target=reuse)
        assert len(ours) == len(theirs)
        for i in (0, 1, len(ours) - 1):
            assert ours[i]["input_ids"].tolist() == theirs[i]["input_ids"].tolist()


def test_masked_token_count_of_the_shipped_data_matches_the_answers(smollm2_dir):
    """Every shipped document is one block of 129 tokens; the trained targets are exactly the answer tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ds = PackedContinuousDataset(REPO / "data/modalities/chat_val.pbin", 128, "input_ids", False)
    batch = GPT2Collator("input_ids", "target_ids")([ds[i] for i in range(len(ds))])
    trained = int((mask_targets(batch["labels"], B, E) != -100).sum())
    lines = (REPO / "data/modalities/chat_val.jsonl").read_text().splitlines()
    answers = [json.loads(line)["chat"].split("<|im_start|>")[1].split("<|im_end|>")[0] for line in lines]
    # the answer's tokens as the tokenizer cuts them inside the whole text (markers are special tokens)
    expected = 0
    for line in lines:
        ids = tok(json.loads(line)["chat"])["input_ids"]
        expected += ids.index(E) - ids.index(B) - 1
    assert trained == expected and expected > sum(len(a.split()) for a in answers)


def _validate(monkeypatch, config: Path, *overrides: str, world: int = 1) -> str:
    from lorafit.run.build import validate_config

    for name, value in (("WORLD_SIZE", world), ("RANK", 0), ("LOCAL_RANK", 0)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(REPO)
    # W&B ONLINE needs a login; OFFLINE is the one non-size override
    return validate_config(config, (*overrides, "evaluation_subscriber.config.mode=OFFLINE"))


@pytest.mark.usefixtures("smollm2_dir")  # the config reads the real SmolLM2 folder: `slow` (tests/conftest.py)
def test_validate_prints_modalities_steps_and_global_batch(monkeypatch):
    """Modalities (lora branch) trains one pass: per rank floor(N / W) samples (DistributedSampler, drop_last),
    floor(that / micro) micro-batches, one step per gradient_acc_steps of them."""
    n = len(read_pbin(REPO / "data/modalities/chat_train.pbin").tokens) // 129  # reuse_last_target: false
    config = yaml.safe_load(SHARED.read_text())["settings"]["training"]
    micro, acc = 1, 4
    overrides = [
        "settings.training.sequence_length=128",
        f"settings.training.local_train_micro_batch_size={micro}",
        f"settings.training.gradient_acc_steps={acc}",
    ]
    for world in (1, 2):
        steps = (n // world // micro) // acc
        text = _validate(monkeypatch, SHARED, *overrides, world=world)
        assert (
            f"Modalities config: {steps} steps on {world} process(es); global batch {micro * acc * world} "
            f"samples = micro batch {micro} x gradient accumulation {acc} x world size {world}, "
            f"{micro * acc * world * 128:,} tokens per step"
        ) in text
        assert (
            f"log every {config['training_log_interval_in_steps']}, evaluate every "
            f"{config['evaluation_interval_in_steps']}, checkpoint every "
            f"{config['checkpointing_interval_in_steps']} steps"
        ) in text


@pytest.mark.usefixtures("smollm2_dir")  # the config reads the real SmolLM2 folder: `slow` (tests/conftest.py)
def test_modalities_config_errors_name_the_yaml_key(tmp_path, monkeypatch):
    config = yaml.safe_load(SHARED.read_text())
    config["collate_fn"]["config"]["loss_ignore_index"] = -1
    config["settings"]["training"]["sequance_length"] = 5
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"settings.training.sequance_length: unknown key 'sequance_length'"):
        _validate(monkeypatch, path)
    del config["settings"]["training"]["sequance_length"]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"collate_fn.config.loss_ignore_index: must be -100"):
        _validate(monkeypatch, path, "settings.training.sequence_length=128")
    config["collate_fn"]["config"]["loss_ignore_index"] = -100
    config["scheduler"]["config"]["total_steps"] = 3
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"scheduler.config.total_steps: 3 steps, but the run takes 200"):
        _validate(monkeypatch, path, "settings.training.sequence_length=128", "settings.training.gradient_acc_steps=1")
    with pytest.raises(
        UserError,
        match=r"activation_checkpointing_modules: lorafit checkpoints the model's decoder "
        r"blocks \(LlamaDecoderLayer\); \['LlamaMLP'\]",
    ):
        _validate(
            monkeypatch,
            SHARED,
            "settings.training.sequence_length=128",
            "settings.training.activation_checkpointing_modules=[LlamaMLP]",
        )
    from lorafit.config.context import build_context
    from lorafit.run.build import build_run, load_run_config

    _config, graph = load_run_config(
        SHARED,
        overrides=(
            "settings.training.sequence_length=128",
            "settings.training.activation_checkpointing_modules=[LlamaDecoderLayer]",
            "evaluation_subscriber.config.mode=OFFLINE",
        ),
    )
    with build_context(meta_device=True, load_weights=False):
        assert build_run(graph).parallelism.config.activation_checkpointing
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the optional package were not installed
    with pytest.raises(
        UserError,
        match=r"evaluation_subscriber.config.mode: results_subscriber/wandb needs the "
        r"'wandb' package.*pip install 'lorafit\[wandb\]', or use variant_key: dummy",
    ):
        _validate(monkeypatch, SHARED, "settings.training.sequence_length=128")


@pytest.mark.parametrize("name", ["config_lorem_ipsum_lora.yaml", "config_lorem_ipsum_lora_training.yaml"])
def test_every_component_and_key_of_the_shared_config_has_a_line_in_docs(name):
    """The shared (lora branch) config and the lora_2 branch's: every component and key has its line."""
    import re

    doc = (REPO / "docs" / "modalities.md").read_text()
    words = set(re.findall(r"\w+", doc.split("## Components and keys")[1]))  # the table's words
    config = yaml.safe_load((REPO / "tests/fixtures/modalities" / name).read_text())
    missing = []

    def walk(value, path):
        if isinstance(value, dict) and "component_key" in value:
            if value["variant_key"] not in doc:
                missing.append(f"{value['component_key']}/{value['variant_key']}")
            for key, sub in (value.get("config") or {}).items():
                if key not in words:
                    missing.append(f"{path}.config.{key}")
                walk(sub, f"{path}.config.{key}")
        elif isinstance(value, dict):
            for key, sub in value.items():
                walk(sub, f"{path}.{key}")
        elif isinstance(value, list):
            for i, sub in enumerate(value):
                walk(sub, f"{path}[{i}]")

    for key, value in config.items():
        walk(value, key)
    for key, value in config["settings"].items():
        for sub in value if isinstance(value, dict) else [None]:
            name = f"{key}.{sub}" if sub else key
            if (sub or key) not in words:
                missing.append(f"settings.{name}")
    assert not missing, missing


@pytest.mark.usefixtures("smollm2_dir")  # the config reads the real SmolLM2 folder: `slow` (tests/conftest.py)
def test_newer_settings_layout_steps_and_consistency(tmp_path, monkeypatch):
    """modalities 0.5.0's settings: steps = training_target.num_target_steps; its consistency checks apply."""
    config = yaml.safe_load(SHARED.read_text())
    del config["settings"]["training"]
    config["settings"]["step_profile"] = {
        "gradient_accumulation_steps": 2,
        "local_train_micro_batch_size": 2,
        "sequence_length": 128,
    }
    config["settings"]["intervals"] = {
        "training_log_interval_in_steps": 2,
        "checkpointing_interval_in_steps": 6,
        "evaluation_interval_in_steps": 6,
    }
    config["settings"]["training_target"] = {"num_target_steps": 12, "num_target_tokens": 12 * 2 * 2 * 128}
    config["settings"]["training_progress"] = {
        "global_num_seen_tokens": 0,
        "num_seen_steps": 0,
        "num_seen_samples": 0,
        "last_step": -1,
    }
    text = yaml.safe_dump(config)
    for old, new in (
        ("settings.training.gradient_acc_steps", "settings.step_profile.gradient_accumulation_steps"),
        ("settings.training.global_num_seen_tokens", "settings.training_progress.global_num_seen_tokens"),
        ("settings.training.", "settings.step_profile."),
    ):
        text = text.replace(old, new)
    path = tmp_path / "new.yaml"
    path.write_text(text)
    out = _validate(monkeypatch, path)
    assert "12 steps on 1 process(es); global batch 4 samples = micro batch 2 x gradient accumulation 2" in out
    with pytest.raises(UserError, match=r"settings.intervals.evaluation_interval_in_steps: the last step will not"):
        _validate(monkeypatch, path, "settings.intervals.evaluation_interval_in_steps=5")
    with pytest.raises(UserError, match=r"settings.training_target: 500 tokens per step are required"):
        _validate(monkeypatch, path, "settings.training_target.num_target_tokens=6000")
