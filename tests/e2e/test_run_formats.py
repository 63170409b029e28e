"""`lorafit run` trains on the formats people already have: ShareGPT JSONL, Alpaca JSONL and a Parquet file (read
with `datasets`), each detected, bin-packed whole and trained for a few steps on the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorafit.cli import main

QUESTIONS = [
    ("Capital of France?", "Paris"),
    ("Capital of Italy?", "Rome"),
    ("Two plus two?", "four"),
    ("Sky colour?", "blue"),
    ("Capital of Spain?", "Madrid"),
    ("Lorem?", "ipsum dolor"),
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": q},
            {"from": "gpt", "value": a},
        ]
    }
    for q, a in QUESTIONS * 4
]
ALPACA = [{"instruction": "Answer the question.", "input": q, "output": a} for q, a in QUESTIONS * 4]


def config(model_dir: Path, data: Path, variant: str, cache: Path) -> dict:
    ref = {"instance_key": "tokenizer", "pass_type": "BY_REFERENCE"}
    dataset = {"path": str(data), "cache_path": str(cache), "tokenizer": ref, "packing": True}
    return {
        "settings": {
            "seed": 3,
            "step_profile": {
                "local_train_micro_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "sequence_length": 96,
            },
            "training_target": {"num_target_steps": 4},
            "intervals": {"training_log_interval_in_steps": 1, "checkpointing_interval_in_steps": 4},
        },
        "tokenizer": {"component_key": "tokenizer", "variant_key": "huggingface", "config": {"path": str(model_dir)}},
        "base_model": {
            "component_key": "model",
            "variant_key": "huggingface_pretrained_model",
            "config": {"model_name_or_path": str(model_dir)},
        },
        "model": {
            "component_key": "model",
            "variant_key": "lora",
            "config": {
                "r": 4,
                "alpha": 8,
                "target_layers": ["q_proj", "v_proj"],
                "model": {"instance_key": "base_model", "pass_type": "BY_REFERENCE"},
            },
        },
        "train_dataset": {"component_key": "dataset", "variant_key": variant, "config": dataset},
        "optimizer": {"component_key": "optimizer", "variant_key": "adamw", "config": {"lr": 2e-2}},
    }


@pytest.mark.parametrize(
    ("name", "variant", "fmt"),
    [
        ("sharegpt.jsonl", "jsonl_instruction", "sharegpt"),
        ("alpaca.jsonl", "jsonl_instruction", "alpaca"),
        ("alpaca.parquet", "hf_datasets", "alpaca"),
    ],
)
def test_format_trains_through_lorafit_run(tmp_path, tiny_model_dir, capsys, name, variant, fmt):
    data = tmp_path / name
    records = SHAREGPT if fmt == "sharegpt" else ALPACA
    if data.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(records).to_parquet(str(data))
    else:
        data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config(tiny_model_dir, data, variant, tmp_path / "cache" / "train")))
    code = main(
        [
            "run",
            "--config_file_path",
            str(config_path),
            "--experiments_root_path",
            str(tmp_path / "exp"),
            "--experiment_id",
            "fmt",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{name}: format {fmt} (detected from {data}" in out
    assert "24 conversations packed whole into" in out and "packing efficiency" in out
    rows = [json.loads(line) for line in (tmp_path / "exp" / "fmt" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (tmp_path / "exp" / "fmt" / "adapter" / "adapter_model.safetensors").is_file()
