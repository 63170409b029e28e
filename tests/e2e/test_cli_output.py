"""What the commands print outside a terminal: no library progress bars (`merge`'s writing bar only at a
terminal), `validate`'s summary (every module only with --verbose), and training lines that say `step N/total`
and an ETA."""

from __future__ import annotations

import re

import pytest
import yaml

from lorafit.cli import main
from tiny_runs import evaluated_run_config

STEPS = 3


@pytest.fixture(scope="module")
def config_path(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_output")
    config = evaluated_run_config(tiny_model_dir, tmp, steps=STEPS)
    del config["evaluators"]
    config["settings"]["intervals"] = {"training_log_interval_in_steps": 1, "evaluation_interval_in_steps": 2}
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_lines_carry_step_total_and_eta_and_no_loading_bar(config_path, tmp_path, capfd):
    assert (
        main(["run", "--config", str(config_path), "--experiments-root-path", str(tmp_path), "--experiment-id", "r"])
        == 0
    )
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err and "it/s]" not in out + err
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    train = [line for line in lines if " loss=" in line]
    assert [int(re.match(r"step (\d+)/3 eta \d+:\d\d ", line).group(1)) for line in train] == [1, 2, 3]
    assert any(re.match(r"step 2/3 eta \d+:\d\d eval/lorem/loss=", line) for line in lines)
    assert out.count("trainable params:") == 1


def test_merge_prints_its_own_lines_and_no_bar_outside_a_terminal(config_path, tmp_path, tiny_model_dir, capfd):
    assert (
        main(["run", "--config", str(config_path), "--experiments-root-path", str(tmp_path), "--experiment-id", "m"])
        == 0
    )
    capfd.readouterr()
    adapter = tmp_path / "m" / "adapter"
    assert (
        main(
            [
                "merge",
                "--base",
                str(tiny_model_dir),
                "--adapter",
                str(adapter),
                "--output-dir",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err and "Writing model shards" not in out + err and "it/s]" not in err
    assert out.count("writing the merged model to") == 1 and out.count("merged model written to") == 1


def test_validate_summarises_and_lists_modules_with_verbose(config_path, capfd):
    assert main(["validate", "--config", str(config_path)]) == 0
    out = capfd.readouterr().out
    assert out.count("trainable params:") == 1
    assert "target 'q_proj': 2 modules: model.layers.*.self_attn.q_proj (2)" in out
    assert "model.layers.0.self_attn.q_proj" not in out and "--verbose lists every adapted module" in out
    assert main(["validate", "--config", str(config_path), "--verbose"]) == 0
    out = capfd.readouterr().out
    assert out.count("trainable params:") == 1
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+model\.layers\.\d+\.self_attn\.", line)]
    assert [r[0] for r in rows] == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
