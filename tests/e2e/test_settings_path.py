"""One typed settings object from the YAML to the loop: what `lorafit validate` says a run will do is what
`lorafit run` then does (steps, tokens per step), through the real CLI."""

from __future__ import annotations

import re

import yaml

from cli_run import lorafit, lorafit_run, metrics
from tiny_runs import tiny_run_config


def test_validate_summary_equals_what_the_loop_does(tmp_path, tiny_model_dir):
    config = tiny_run_config(tiny_model_dir, cache_path=tmp_path / "lorem", micro=3, accum=2, steps=3)
    config["settings"]["step_profile"]["sequence_length"] = 24
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    checked = lorafit("validate", "--config_file_path", str(path))
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    summary = re.search(
        r"steps: (\d+) \(one process\); tokens per step per process: (\d+) = micro batch (\d+) x "
        r"accumulation (\d+) x sequence (\d+)",
        checked.stdout,
    )
    assert summary, checked.stdout
    steps, tokens, micro, accum, sequence = map(int, summary.groups())
    assert (steps, micro, accum, sequence) == (3, 3, 2, 24) and tokens == 3 * 2 * 24

    ran = lorafit_run(path, tmp_path / "exp", "--experiment_id", "same")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    rows = metrics(tmp_path / "exp" / "same")
    assert sorted(rows) == list(range(1, steps + 1))
    assert [rows[s]["tokens"] for s in sorted(rows)] == [tokens * s for s in range(1, steps + 1)]
