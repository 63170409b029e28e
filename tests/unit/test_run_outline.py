"""The run-level decisions taken before building (RunOutline: parallelism, meta build, adapters from a checkpoint)
come from the checked components' typed configs, references followed to the entity they name, not from the YAML
dict read again."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from lorafit.config.loader import load_config
from lorafit.run.build import meta_build_blocker, run_outline

REPO = Path(__file__).resolve().parents[2]
REF = {"pass_type": "BY_REFERENCE"}


@pytest.fixture(scope="module")
def seed_config():
    """The seed's layout: huggingface_from_config <- checkpointed <- lora, the run's model a reference."""
    return load_config(REPO / "configs" / "config_lorem_ipsum_lora.yaml", None, ())


def test_the_parallelism_entity_is_the_one_an_alias_of_an_alias_names(seed_config):
    config = copy.deepcopy(seed_config)
    config["ddp"] = {"component_key": "parallelism", "variant_key": "ddp", "config": {}}
    config["sharding"] = {**REF, "instance_key": "ddp"}
    config["parallelism"] = {**REF, "instance_key": "sharding"}
    assert run_outline(config).parallelism == "ddp"  # the raw dict, read one reference deep, said fsdp2
    assert meta_build_blocker(config, 2) == "not fsdp2"


def test_fsdp2_settings_are_the_typed_ones_defaults_included(seed_config):
    config = copy.deepcopy(seed_config)
    config["parallelism"] = {"component_key": "parallelism", "variant_key": "fsdp2", "config": {}}
    assert run_outline(config).load_after_sharding is True  # FSDP2Config's default
    config["parallelism"]["config"]["load_after_sharding"] = False
    assert meta_build_blocker(config, 2) == "parallelism.config.load_after_sharding is false"


def test_adapters_come_from_a_checkpoint_that_wraps_the_lora_model(seed_config):
    assert not run_outline(seed_config).adapters_from_checkpoint  # lora over checkpointed: adapters are drawn
    config = copy.deepcopy(seed_config)
    config["lora_model"]["config"]["model"] = {**REF, "instance_key": "huggingface_smol_llm_model"}
    config["alias"] = {**REF, "instance_key": "lora_model"}
    config["checkpointed_model"]["config"]["model"] = {**REF, "instance_key": "alias"}
    config["model"] = {**REF, "instance_key": "checkpointed_model"}
    assert run_outline(config).adapters_from_checkpoint


def test_a_frozen_dtype_needs_the_whole_weights_before_sharding(seed_config):
    config = copy.deepcopy(seed_config)
    config["lora_model"]["config"]["frozen_dtype"] = "bfloat16"
    assert "model/lora frozen_dtype bfloat16" in meta_build_blocker(config, 2)
