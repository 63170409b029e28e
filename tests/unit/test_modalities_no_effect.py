"""Every Modalities key lorafit accepts without acting on it is said, with its YAML path, value and reason."""

from pathlib import Path

import yaml

from lorafit.modalities.no_effect import NO_EFFECT, keys_without_effect

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_config_keys_without_effect_are_named_by_path():
    config = yaml.safe_load((REPO / "configs" / "modalities" / "config_lorem_ipsum_lora.yaml").read_text())
    said = {line.split("=")[0] for line in keys_without_effect(config)}
    for path in (
        "train_dataloader.config.num_workers",
        "train_dataloader.config.pin_memory",
        "train_dataloader.config.shuffle",
        "val_dataloader.config.num_workers",
        "wrapped_model.config.sync_module_states",
        "batch_progress_subscriber.config.gradient_acc_steps",
    ):
        assert path in said, (path, sorted(said))


def test_every_listed_key_is_one_lorafit_accepts():
    """A key in the table that the component's config model does not know would never be given: a stale entry."""
    from lorafit.components import load_builtin_components
    from lorafit.config.registry import REGISTRY

    load_builtin_components()
    for (component_key, variant_key), keys in NO_EFFECT.items():
        fields = REGISTRY.get(component_key, variant_key).config_model.model_fields
        assert set(keys) <= set(fields), (component_key, variant_key, set(keys) - set(fields))
