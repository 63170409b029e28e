"""DoRA and PiSSA under FSDP2 (gloo, 2 CPU processes) train exactly like one process on the same global batch.

DoRA's norm needs whole rows of W + s B A: inside forward FSDP2 hands each layer its unsharded parameters, and
the magnitude vector is sharded and gathered like A and B. PiSSA decomposes before sharding; its converted
adapter (rank 2r) is written from the gathered A, B and the replicated A0, B0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_run import spawn_ranks

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
STEPS = 3
VARIANTS = {"dora": {"use_dora": True}, "pissa": {"init": "pissa"}}


def _model(variant: str):
    from engine_cases import TARGETS
    from lorafit.lora import apply_lora
    from tiny import make_llama

    return apply_lora(make_llama(), r=4, alpha=8, target_layers=TARGETS, seed=3, **VARIANTS[variant])


def _worker(rank: int, world: int, out: str) -> None:
    from engine_cases import make_job
    from lorafit.distributed.env import init_distributed
    from lorafit.distributed.parallel import FSDP2Strategy
    from lorafit.training.loop import train

    env = init_distributed()
    results = {}
    try:
        for variant in VARIANTS:
            run = train(
                make_job(
                    f"{out}/fsdp2_{variant}",
                    env,
                    parallelism=FSDP2Strategy(),
                    micro=1,
                    accum=2,
                    steps=STEPS,
                    model=_model(variant),
                )
            )
            results[variant] = run.losses
        if rank == 0:
            torch.save(results, f"{out}/results.pt")
    finally:
        env.destroy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from engine_cases import make_job
    from lorafit.distributed.env import init_distributed
    from lorafit.training.loop import train

    out = tmp_path_factory.mktemp("variants")
    env = init_distributed()
    reference = {
        v: train(make_job(out / f"single_{v}", env, micro=2, accum=2, steps=STEPS, model=_model(v))).losses
        for v in VARIANTS
    }
    spawn_ranks(_worker, str(out))
    return out, reference, torch.load(out / "results.pt", weights_only=False)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp2_trains_like_one_process(runs, variant):
    out, reference, results = runs
    assert [v for _, v in results[variant]] == pytest.approx([v for _, v in reference[variant]], abs=1e-5, rel=0)
    expected, got = _adapter(out / f"single_{variant}"), _adapter(out / f"fsdp2_{variant}")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].shape == value.shape, key  # full tensors, not one rank's slice
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)
    if variant == "dora":
        magnitudes = [k for k in got if k.endswith("lora_magnitude_vector")]
        assert len(magnitudes) == 2 * 3


def test_fsdp2_dora_adapter_loads_in_peft(runs):
    import peft

    from lorafit.lora import load_adapter
    from tiny import make_llama

    out, _, _ = runs
    x = torch.arange(3, 19).reshape(2, 8)
    theirs = peft.PeftModel.from_pretrained(make_llama(), out / "fsdp2_dora" / "adapter").eval()
    ours = load_adapter(make_llama(), out / "single_dora" / "adapter")
    torch.testing.assert_close(theirs(input_ids=x).logits, ours(x).logits, rtol=0, atol=1e-5)
