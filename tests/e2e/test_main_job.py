"""The main job (configs/smollm2_135m_lora.yaml) on the real SmolLM2, with fewer steps and a smaller held-out set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lorafit.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_run(smollm2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main_job")
    config = yaml.safe_load((REPO / "configs" / "smollm2_135m_lora.yaml").read_text())
    config["settings"]["training_target"]["num_target_steps"] = 12
    config["settings"]["intervals"] = {
        "training_log_interval_in_steps": 4,
        "evaluation_interval_in_steps": 12,
        "checkpointing_interval_in_steps": 12,
    }
    config["evaluators"][0]["config"]["limit"] = 16
    path = tmp / "main_short.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    import os

    cwd = os.getcwd()
    os.chdir(REPO)  # the config's paths are relative to the repository root
    try:
        assert (
            main(
                [
                    "run",
                    "--config_file_path",
                    str(path),
                    "--experiments_root_path",
                    str(tmp / "exp"),
                    "--experiment_id",
                    "short",
                ]
            )
            == 0
        )
    finally:
        os.chdir(cwd)
    return tmp / "exp" / "short"


@pytest.mark.slow
def test_heldout_loss_falls_and_report_is_written(trained_run):
    before = json.loads((trained_run / "eval_before.json").read_text())
    after = json.loads((trained_run / "eval_after.json").read_text())
    (name,) = after
    assert after[name]["loss"] < 0.5 * before[name]["loss"]
    assert after[name]["accuracy"] >= before[name]["accuracy"]
    assert after[name]["n"] == 16
    report = (trained_run / "report.md").read_text()
    assert "| loss |" in report and "| accuracy |" in report and "before:" in report and "after:" in report


@pytest.mark.slow
def test_adapter_loads_in_peft_and_merge_matches(trained_run, smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer("Record for this sentence: Ada Lovelace, 36, a mathematician from London.", return_tensors="pt")[
        "input_ids"
    ]
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smollm2_dir), trained_run / "adapter"
    ).eval()
    with torch.no_grad():
        expected = peft_model(ids).logits
    del peft_model

    out = tmp_path / "merged"
    assert (
        main(["merge", "--base", str(smollm2_dir), "--adapter", str(trained_run / "adapter"), "--output_dir", str(out)])
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
