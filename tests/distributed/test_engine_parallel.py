"""Two CPU processes (gloo) with FSDP2 and with DDP train exactly like one process on the same global batch.

One spawn runs, on the tiny Llama with LoRA on q/v/down_proj and a global batch of 4 samples:
- fsdp2 (activation checkpointing on), micro-batch 1 x accumulation 2 x 2 ranks, checkpoints every 2 steps;
- ddp, micro-batch 2 x accumulation 1 x 2 ranks;
- fsdp2 resumed from the first run's step-2 checkpoint (sharded save -> sharded load);
- ddp with the frozen weights stored in bf16, and fsdp2's refusal of such a model.
The reference is one process, micro-batch 2 x accumulation 2. Every rank reads the SAME samples per step
(the sampler's contract), so losses agree to float rounding, and the adapters written by rank 0 (gathered
from the shards) must equal the reference in every tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_run import spawn_ranks

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
STEPS = 4
PROBE = torch.arange(3, 19).reshape(2, 8)


def _worker(rank: int, world: int, out: str) -> None:
    from engine_cases import make_job
    from lorafit.distributed.env import init_distributed
    from lorafit.distributed.parallel import DDPStrategy, FSDP2Strategy, ParallelismConfig
    from lorafit.training.loop import train

    env = init_distributed()
    assert env.backend == "gloo" and env.world_size == world and env.rank == rank
    results = {}
    try:
        fsdp2 = FSDP2Strategy(ParallelismConfig(activation_checkpointing=True))
        run = train(
            make_job(
                f"{out}/fsdp2",
                env,
                parallelism=fsdp2,
                micro=1,
                accum=2,
                steps=STEPS,
                checkpointing_interval_in_steps=2,
                gather_full_model=True,
            )
        )
        results["fsdp2"] = (run.losses, run.eval_losses)
        if rank == 0:  # an unsharded copy with the trained adapter, for rank-0 evaluators and merged export
            with torch.no_grad():
                results["fsdp2_eval_logits"] = run.model_for_eval()(PROBE).logits
        run = train(make_job(f"{out}/ddp", env, parallelism=DDPStrategy(), micro=2, accum=1, steps=STEPS))
        results["ddp"] = (run.losses, run.eval_losses)
        run = train(
            make_job(
                f"{out}/fsdp2_resumed",
                env,
                parallelism=FSDP2Strategy(),
                micro=1,
                accum=2,
                steps=STEPS,
                resume_from=f"{out}/fsdp2/checkpoints/step_000002",
            )
        )
        results["fsdp2_resumed"] = (run.losses, run.eval_losses)
        # frozen weights stored in bf16 (model/lora frozen_dtype): DDP trains them, FSDP2 refuses them up front
        from engine_cases import lora_model
        from lorafit.errors import UserError
        from lorafit.frozen.linear import store_frozen_linears

        bf16_base = [lora_model(), lora_model()]
        for model in bf16_base:
            store_frozen_linears(model, torch.bfloat16)
        run = train(
            make_job(
                f"{out}/ddp_bf16", env, parallelism=DDPStrategy(), micro=2, accum=1, steps=STEPS, model=bf16_base[0]
            )
        )
        results["ddp_bf16"] = (run.losses, run.eval_losses)
        try:
            train(
                make_job(
                    f"{out}/fsdp2_bf16",
                    env,
                    parallelism=FSDP2Strategy(),
                    micro=1,
                    accum=2,
                    steps=STEPS,
                    model=bf16_base[1],
                )
            )
            results["fsdp2_bf16_refusal"] = ""
        except UserError as error:
            results["fsdp2_bf16_refusal"] = str(error)
        if rank == 0:
            torch.save(results, f"{out}/results.pt")
    finally:
        env.destroy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from engine_cases import make_job
    from lorafit.distributed.env import init_distributed
    from lorafit.training.loop import train

    out = tmp_path_factory.mktemp("engine")
    reference = train(make_job(out / "single", init_distributed(), micro=2, accum=2, steps=STEPS))
    spawn_ranks(_worker, str(out))
    return out, reference, torch.load(out / "results.pt", weights_only=False)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", ["fsdp2", "ddp"])
def test_same_losses_as_one_process(runs, name):
    _out, reference, results = runs
    losses, eval_losses = results[name]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert [v for _, v in losses] == pytest.approx([v for _, v in reference.losses], abs=1e-5, rel=0)
    assert losses[-1][1] != losses[0][1]  # it trained
    assert eval_losses["held_out"] == pytest.approx(reference.eval_losses["held_out"], abs=1e-5)


@pytest.mark.parametrize("name", ["fsdp2", "ddp"])
def test_gathered_adapter_is_complete_and_equal(runs, name):
    out, _reference, _ = runs
    expected, got = _adapter(out / "single"), _adapter(out / name)
    assert got.keys() == expected.keys() and len(expected) == 2 * 3 * 2  # 2 layers x 3 modules x (A, B)
    for key, value in expected.items():
        assert got[key].shape == value.shape, key  # full matrices, not one rank's rows
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)
    trained_b = [k for k in expected if "lora_B" in k]
    assert all(expected[k].abs().max() > 0 for k in trained_b)  # B moved away from its zero init


def test_sharded_checkpoint_resumes_exactly(runs):
    _out, _reference, results = runs
    straight, resumed = results["fsdp2"][0], results["fsdp2_resumed"][0]
    assert [s for s, _ in resumed] == [3, 4]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in straight[2:]], abs=1e-6, rel=0)
    torch.testing.assert_close(_adapter(_out / "fsdp2_resumed"), _adapter(_out / "fsdp2"), rtol=0, atol=1e-6)


def test_unsharded_copy_for_rank0_evaluation(runs):
    _out, reference, results = runs
    with torch.no_grad():
        expected = reference.model_for_eval()(PROBE).logits
    torch.testing.assert_close(results["fsdp2_eval_logits"], expected, rtol=0, atol=1e-5)


def test_bf16_frozen_weights_train_under_ddp_and_fsdp2_refuses_them(runs):
    _, _, results = runs
    fp32, bf16 = dict(results["ddp"][0]), dict(results["ddp_bf16"][0])
    assert fp32.keys() == bf16.keys() and all(abs(bf16[s] - fp32[s]) <= 0.02 * fp32[s] for s in fp32)
    assert "frozen_dtype" in results["fsdp2_bf16_refusal"] and "ddp" in results["fsdp2_bf16_refusal"]
