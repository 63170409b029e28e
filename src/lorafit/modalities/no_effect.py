"""Modalities config keys that lorafit accepts and that change nothing here, each said once in the log with why.

Nothing is dropped without a word (the project's rule): a key is honoured, refused, or named here. The table is by
component (component_key, variant_key); a key is said when the config gives it, with its YAML path and value.
"""

from __future__ import annotations

from typing import Any

from lorafit.config.graph import component_blocks
from lorafit.console import info

IN_PROCESS = "lorafit reads the memory-mapped samples in the training process: no loader workers, nothing pinned"
PROGRESS = "the progress bar counts the run's own steps, from the train data loader and the step plan"

NO_EFFECT: dict[tuple[str, str], dict[str, str]] = {
    ("data_loader", "default"): {
        "num_workers": IN_PROCESS,
        "pin_memory": IN_PROCESS,
        "shuffle": "the sampler's shuffle decides the order (the lora branch's loader key had no effect there either)",
    },
    ("model", "fsdp_wrapped"): {
        "sync_module_states": "every rank reads the same weights from the checkpoint (or its own shards of them)",
        "sharding_strategy": "lorafit shards with FSDP2 (fully_shard per block, then the root): FULL_SHARD",
    },
    ("progress_subscriber", "rich"): {
        "train_dataloader": PROGRESS,
        "train_dataloader_tag": PROGRESS,
        "eval_dataloaders": PROGRESS,
        "gradient_acc_steps": PROGRESS,
        "num_target_steps": PROGRESS,
    },
    ("results_subscriber", "wandb"): {
        "global_rank": "results are logged from rank 0",
        "config_file_path": "the run folder keeps the config (config.yaml, config.resolved.yaml) and W&B gets it",
    },
    ("results_subscriber", "rich"): {
        "num_ranks": "results are printed from rank 0",
        "global_rank": "results are printed from rank 0",
    },
}


def keys_without_effect(config: dict[str, Any]) -> list[str]:
    """`path=value: why` for every key of `config` that lorafit accepts from Modalities and does not act on."""
    found = []
    for path, node in component_blocks(config):
        if not isinstance(node.get("config"), dict):
            continue
        reasons = NO_EFFECT.get((node["component_key"], node.get("variant_key")), {})
        for key, reason in reasons.items():
            if key in node["config"]:
                value = node["config"][key]
                shown = value if not isinstance(value, (dict, list)) else type(value).__name__
                found.append(f"{path}.config.{key}={shown}: {reason}")
    return found


def say_keys_without_effect(config: dict[str, Any]) -> None:
    lines = keys_without_effect(config)
    if lines:
        info("Modalities keys with no effect in lorafit (docs/modalities.md):\n  " + "\n  ".join(lines))
