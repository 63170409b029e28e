"""Full fine-tuning (a model without LoRA) through the same training loop, on the tiny Llama (tied embeddings).

Checked: the loss falls; every parameter moves and the tied head stays one parameter (embed_tokens IS
lm_head); checkpoints hold every trainable parameter once, plus the optimizer; resume is bitwise exact;
`model/` is a Hugging Face folder that AutoModelForCausalLM loads with the trained logits; FSDP2 (and DDP)
over two processes trains like one process and writes the same (gathered) `model/`; `lorafit run` with `model`
referring straight to the base model writes `model/`, not `adapter/`; the gradient-flow check without LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cli_run import spawn_ranks

TESTS = Path(__file__).resolve().parents[1]


STEPS = 8
PROBE = torch.arange(3, 19).reshape(2, 8)


class CountingDataset(torch.utils.data.Dataset):
    """Rows that count up by one from a random start among a few tokens: learnable in a few steps (the loss
    falls far below ln(vocab)), unlike random tokens."""

    def __init__(self, n: int = 64, length: int = 12, seed: int = 0, starts_below: int = 20):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(3, starts_below, (n,), generator=g)
        self.rows = starts[:, None] + torch.arange(length + 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        return {"input_ids": row[:-1], "labels": row[1:].clone()}


def full_job(run_dir, env, *, attention_dropout: float = 0.0, **overrides):
    from engine_cases import make_job
    from lorafit.training.optim import AdamWConfig, OptimizerFactory
    from tiny import make_llama

    values = dict(
        model=make_llama(attention_dropout=attention_dropout).train(),
        train_dataset=CountingDataset(),
        eval_datasets={"held_out": CountingDataset(n=8, seed=1)},
        micro=2,
        accum=2,
        steps=STEPS,
        optimizer_factory=OptimizerFactory(AdamWConfig(lr=1e-2, weight_decay=0.01)),
    )
    values.update(overrides)
    return make_job(run_dir, env, **values)


def model_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from lorafit.distributed.env import init_distributed
    from lorafit.training.loop import train
    from tiny import make_tokenizer

    env = init_distributed()
    out = tmp_path_factory.mktemp("full")
    # attention dropout on: the resumed run must restore the RNG states too
    common = dict(attention_dropout=0.1, checkpointing_interval_in_steps=STEPS // 2, tokenizer=make_tokenizer())
    straight = train(full_job(out / "straight", env, **common))
    first = train(full_job(out / "split", env, stop_at_step=STEPS // 2, **common))
    second = train(full_job(out / "split", env, resume_from="latest", **common))
    return out, straight, first, second


@pytest.mark.integration  # the `runs` fixture: three runs of the training loop
def test_full_fine_tuning_trains_every_parameter_and_keeps_the_head_tied(runs):
    from tiny import make_llama

    _out, straight, _, _ = runs
    losses = [v for _, v in straight.losses]
    assert losses[-1] < 0.8 * losses[0]  # 6.0 -> 4.2 in 8 steps
    assert straight.eval_losses["held_out"] < 0.8 * losses[0]
    model, initial = straight.model, make_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one parameter
    before = dict(initial.named_parameters())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved == list(before)  # every parameter was updated, embeddings and norms included
    assert straight.adapter_dir is None and not (straight.run_dir / "adapter").exists()
    assert straight.model_dir == straight.run_dir / "model"
    assert (straight.model_dir / "tokenizer.json").is_file()  # the folder is complete: it generates on its own


@pytest.mark.integration  # the `runs` fixture
def test_checkpoint_holds_every_trainable_parameter_once_and_the_optimizer(runs):
    from torch.distributed.checkpoint import FileSystemReader

    out, straight, _, _ = runs
    meta = FileSystemReader(str(out / "straight" / "checkpoints" / f"step_{STEPS:06d}")).read_metadata()
    keys = set(meta.state_dict_metadata)
    names = [n for n, _ in straight.model.named_parameters()]  # tied head listed once, as embed_tokens
    assert {k.removeprefix("model.") for k in keys if k.startswith("model.")} == set(names)
    assert "model.lm_head.weight" not in keys  # the tied head is not stored a second time
    for name in names:
        assert f"optim.state.{name}.exp_avg" in keys and f"optim.state.{name}.exp_avg_sq" in keys


@pytest.mark.integration  # the `runs` fixture
def test_resume_is_bitwise_exact(runs):
    out, straight, first, second = runs
    assert [s for s, _ in second.losses] == list(range(STEPS // 2 + 1, STEPS + 1))
    assert first.losses + second.losses == straight.losses  # floats compared exactly
    assert second.eval_losses == straight.eval_losses
    a, b = model_tensors(out / "straight"), model_tensors(out / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration  # the `runs` fixture
def test_model_folder_loads_with_transformers_and_gives_the_trained_logits(runs):
    from transformers import AutoModelForCausalLM

    _out, straight, _, _ = runs
    loaded = AutoModelForCausalLM.from_pretrained(straight.model_dir).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        expected = straight.model_for_eval()(PROBE).logits
        got = loaded(PROBE).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    trained = straight.model_for_eval().model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, trained, rtol=0, atol=0)  # the trained head, not a fresh one


# --- two processes, FSDP2 -------------------------------------------------------------------------------------


def _worker(rank: int, world: int, out: str) -> None:
    from lorafit.distributed.env import init_distributed
    from lorafit.distributed.parallel import DDPStrategy, FSDP2Strategy
    from lorafit.training.loop import train

    env = init_distributed()
    try:
        results = {}
        for name, strategy, micro, accum in (("fsdp2", FSDP2Strategy(), 1, 2), ("ddp", DDPStrategy(), 2, 1)):
            run = train(
                full_job(
                    f"{out}/{name}",
                    env,
                    parallelism=strategy,
                    micro=micro,
                    accum=accum,
                    steps=4,
                    gather_full_model=True,
                )
            )
            if rank == 0:
                with torch.no_grad():
                    logits = run.model_for_eval()(PROBE).logits
                results[name] = {"losses": run.losses, "eval": run.eval_losses, "logits": logits}
        if rank == 0:
            torch.save(results, f"{out}/results.pt")
    finally:
        env.destroy()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    from lorafit.distributed.env import init_distributed
    from lorafit.training.loop import train

    out = tmp_path_factory.mktemp("full2")
    reference = train(full_job(out / "single", init_distributed(), micro=2, accum=2, steps=4))
    spawn_ranks(_worker, str(out))
    return out, reference, torch.load(out / "results.pt", weights_only=False)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["fsdp2", "ddp"])
def test_two_processes_equal_one_process(two_processes, name):
    out, reference, results = two_processes
    got = results[name]
    assert [v for _, v in got["losses"]] == pytest.approx([v for _, v in reference.losses], abs=1e-5, rel=0)
    assert got["eval"]["held_out"] == pytest.approx(reference.eval_losses["held_out"], abs=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], reference.model_for_eval()(PROBE).logits, rtol=0, atol=1e-5)
    expected, written = model_tensors(out / "single"), model_tensors(out / name)
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        assert written[key].shape == value.shape, key  # whole tensors, not rank 0's shard
        torch.testing.assert_close(written[key], value, rtol=0, atol=1e-5, msg=key)


# --- through `lorafit run` -------------------------------------------------------------------------------------
@pytest.mark.integration  # a whole `lorafit run`
def test_lorafit_run_with_a_plain_model_fine_tunes_it_fully(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lorafit.cli import main

    lorem = TESTS.parent / "data" / "lorem_ipsum" / "lorem_ipsum.txt"
    config = {
        "settings": {
            "seed": 3,
            "training_target": {"num_target_steps": 4},
            "eval_max_batches": 2,
            "step_profile": {
                "local_train_micro_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "sequence_length": 32,
            },
            "intervals": {"training_log_interval_in_steps": 1, "checkpointing_interval_in_steps": 2},
        },
        "tokenizer": {
            "component_key": "tokenizer",
            "variant_key": "huggingface",
            "config": {"path": str(tiny_model_dir)},
        },
        "base_model": {
            "component_key": "model",
            "variant_key": "huggingface_pretrained_model",
            "config": {"model_name_or_path": str(tiny_model_dir)},
        },
        "model": {"instance_key": "base_model", "pass_type": "BY_REFERENCE"},
        "train_dataset": {
            "component_key": "dataset",
            "variant_key": "text",
            "config": {
                "path": str(lorem),
                "cache_path": str(tmp_path / "lorem"),
                "tokenizer": {"instance_key": "tokenizer", "pass_type": "BY_REFERENCE"},
            },
        },
        "optimizer": {"component_key": "optimizer", "variant_key": "adamw", "config": {"lr": 1e-3}},
    }
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["run", "--config_file_path", str(path), "--experiments_root_path", str(tmp_path / "exp")]
    assert main([*args, "--experiment_id", "full"]) == 0
    run_dir = tmp_path / "exp" / "full"
    assert (run_dir / "model" / "model.safetensors").is_file() and not (run_dir / "adapter").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) == len(list(base.parameters()))  # all parameters trained, none frozen


# --- the gradient-flow check without LoRA ----------------------------------------------------------------------
def test_gradient_flow_check_for_a_model_without_lora():
    from lorafit.distributed.env import init_distributed
    from lorafit.training.checks import GradientFlowError, check_gradient_flow
    from tiny import make_llama

    env, model = init_distributed(), make_llama().train()
    with pytest.raises(GradientFlowError, match="only zero or no gradients"):
        check_gradient_flow(model, 1, env)  # no backward yet: no gradient at all
    (0.0 * model(PROBE, labels=PROBE).loss).backward()  # connected, but every gradient is zero
    with pytest.raises(GradientFlowError, match="only zero or no gradients"):
        check_gradient_flow(model, 1, env)
    model.zero_grad()
    model(PROBE, labels=PROBE).loss.backward()
    check_gradient_flow(model, 1, env)
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(GradientFlowError, match="1 non-finite"):
        check_gradient_flow(model, 1, env)
