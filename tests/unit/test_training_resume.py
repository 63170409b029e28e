"""Resume is exact: N steps straight == N/2 steps, stop, resume to N (bitwise, one CPU process).

The first part targets N steps too (the schedule depends on it) and stops at N/2 (`stop_at_step`), as a
run killed after its N/2 checkpoint would.

LoRA dropout is on (so the RNG state must be restored), the schedule is warmup + cosine (scheduler state),
weight decay and gradient clipping are on (optimizer state), and the sampler position carries over.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # each test reads the `runs` fixture: three runs of the training loop

STEPS = 4


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from engine_cases import make_job
    from lorafit.distributed.env import init_distributed
    from lorafit.training.loop import train

    env = init_distributed()
    out = tmp_path_factory.mktemp("resume")
    common = dict(
        micro=2, accum=2, dropout=0.2, checkpointing_interval_in_steps=STEPS // 2, evaluation_interval_in_steps=2
    )
    straight = train(make_job(out / "straight", env, steps=STEPS, **common))
    first = train(make_job(out / "split", env, steps=STEPS, stop_at_step=STEPS // 2, **common))
    second = train(make_job(out / "split", env, steps=STEPS, resume_from="latest", **common))
    return out, straight, first, second


def test_resumed_run_is_bitwise_identical(runs):
    out, straight, first, second = runs
    half = STEPS // 2
    assert [s for s, _ in first.losses] == list(range(1, half + 1))
    assert [s for s, _ in second.losses] == list(range(half + 1, STEPS + 1))
    assert second.resumed_from == out / "split" / "checkpoints" / f"step_{half:06d}"
    assert first.losses + second.losses == straight.losses  # floats compared exactly
    a, b = _adapter(out / "straight"), _adapter(out / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert second.steps == STEPS and second.tokens == straight.tokens


def test_resumed_metrics_read_as_one_run(runs):
    out, _straight, _first, _second = runs

    def lines(run):
        return [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]

    split, whole = lines("split"), lines("straight")
    assert [r["step"] for r in split if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in split if "loss" in r] == [r["loss"] for r in whole if "loss" in r]
    assert [r["lr"] for r in split if "loss" in r] == [r["lr"] for r in whole if "loss" in r]
    assert (out / "split" / "loss.png").stat().st_size > 1000
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "split" / "tensorboard").iterdir())


def test_resuming_a_finished_run_trains_nothing(runs):
    from engine_cases import make_job
    from lorafit.distributed.env import init_distributed
    from lorafit.training.loop import train

    out, _straight, _first, _second = runs
    again = train(
        make_job(
            out / "straight",
            init_distributed(),
            steps=STEPS,
            micro=2,
            accum=2,
            dropout=0.2,
            checkpointing_interval_in_steps=STEPS // 2,
            resume_from="latest",
        )
    )
    assert again.losses == [] and again.steps == STEPS
    a = _adapter(out / "straight")
    assert all(torch.equal(a[k], v) for k, v in _adapter(out / "split").items())
