"""`lorafit run` under fsdp2 (gloo, 2 CPU processes) builds the model on the meta device, shards it, and then each
rank reads only its shards of the weights file; the result is what one process builds, tensor for tensor.

One spawn, on the tiny Llama (tied embeddings), three configs:
- `hf`: model/huggingface_pretrained_model (safetensors without lm_head) + LoRA with DoRA; also trained for 2
  steps by `lorafit.run.runner.run`, whose losses must equal a one-process `lorafit run` on the same global batch;
- `checkpointed`: model/huggingface_from_config + model/checkpointed from a torch `.bin` saved with Modalities'
  wrapper prefix (`huggingface_model.`) and both tied names, + LoRA with init pissa (decomposes the loaded base);
- `bf16`: frozen_dtype bfloat16 needs the weights before sharding: the whole-model build, said in the log.
Each rank compares its own shard of every parameter (base, A, B, magnitude) with the same slice of the model
built by one process (`build_run` with world size 1).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from cli_run import metrics, spawn_ranks
from tiny_runs import checkpointed_model, tiny_run_config

STEPS = 2


def _configs(model_dir: Path, folder: Path) -> dict[str, Path]:
    base = tiny_run_config(
        model_dir,
        cache_path=folder / "cache" / "lorem",
        micro=1,
        accum=2,
        steps=STEPS,
        targets=("q_proj", "v_proj", "down_proj"),
    )
    base["settings"]["intervals"]["checkpointing_interval_in_steps"] = STEPS
    hf = copy.deepcopy(base)
    hf["model"]["config"]["use_dora"] = True
    checkpointed = copy.deepcopy(base)
    checkpointed["architecture"] = {
        "component_key": "model",
        "variant_key": "huggingface_from_config",
        "config": {"config_path": str(model_dir)},
    }
    checkpointed["base_model"] = checkpointed_model("architecture", folder / "modalities_model.bin", device=0)
    checkpointed["model"]["config"]["init"] = "pissa"
    bf16 = copy.deepcopy(base)
    bf16["model"]["config"]["frozen_dtype"] = "bfloat16"
    paths = {}
    for name, config in {"hf": hf, "checkpointed": checkpointed, "bf16": bf16}.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(config))
    return paths


def _modalities_checkpoint(model_dir: Path, path: Path) -> None:
    """The tiny model's weights as Modalities saves them: its wrapper's prefix, the tied head under both names."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.save({f"huggingface_model.{k}": v for k, v in model.state_dict().items()}, path)


def _worker(rank: int, world: int, configs: dict[str, str], out: str) -> None:
    from lorafit.distributed.env import init_distributed
    from lorafit.distributed.parallel import FSDP2Strategy
    from lorafit.models.shard_loading import _local_part, is_meta
    from lorafit.run.build import build_run, load_run_config
    from lorafit.run.runner import RunRequest, run
    from lorafit.training.loss import CausalLMLoss

    log = os.open(f"{out}/stdout_{rank}.txt", os.O_WRONLY | os.O_CREAT)
    os.dup2(log, 1)  # what `lorafit run` says on rank 0, for the test to read
    env = init_distributed()
    results: dict = {}
    try:
        for name in ("hf", "checkpointed"):
            _config, graph = load_run_config(Path(configs[name]))
            built = build_run(graph, world_size=world)
            meta = is_meta(built.model) and built.fill_weights_after_sharding is not None
            FSDP2Strategy().wrap(CausalLMLoss(built.model), env, built.fill_weights_after_sharding)
            model = built.model
            reference = dict(build_run(load_run_config(Path(configs[name]))[1]).model.named_parameters())
            differ = []
            for param_name, param in model.named_parameters():
                local, index = _local_part(param)
                if not torch.equal(local, reference[param_name].detach()[index]):
                    differ.append(param_name)
            results[name] = {
                "meta": meta,
                "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
                "tied": model.lm_head.weight is model.model.embed_tokens.weight,
                "differ": differ,
                "compared": len(reference),
            }
        _config, graph = load_run_config(Path(configs["bf16"]))
        results["bf16"] = {"meta": is_meta(build_run(graph, world_size=world).model)}
        results["run"] = str(run(RunRequest(Path(configs["hf"]), Path(out) / "runs", experiment_id="two")))
        if rank == 0:
            torch.save(results, f"{out}/results_{rank}.pt")
        env.barrier()
        if rank == 1:
            torch.save(results, f"{out}/results_{rank}.pt")
    finally:
        env.destroy()


@pytest.fixture(scope="module")
def meta_runs(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("meta_build")
    _modalities_checkpoint(tiny_model_dir, folder / "modalities_model.bin")
    configs = {k: str(v) for k, v in _configs(tiny_model_dir, folder).items()}
    return folder, configs


@pytest.fixture(scope="module")
def spawned(meta_runs):
    folder, configs = meta_runs
    spawn_ranks(_worker, configs, str(folder))
    return [torch.load(folder / f"results_{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.mark.parametrize("name", ["hf", "checkpointed"])
def test_each_rank_reads_its_shards_equal_to_one_process(spawned, name):
    for results in spawned:
        got = results[name]
        assert got["meta"], "fsdp2 on 2 processes did not build on the meta device"
        assert got["sharded"] and got["tied"]
        assert got["compared"] > 20 and got["differ"] == [], got["differ"]


def test_the_log_says_which_build_ran(meta_runs, spawned):
    said = (meta_runs[0] / "stdout_0.txt").read_text()
    assert "the model is built on the meta device; after sharding, each rank reads only its shards of" in said
    assert (
        "every rank builds the whole model and loads its weights before sharding: model/lora frozen_dtype "
        "bfloat16" in said
    )


def test_frozen_dtype_builds_the_whole_model_before_sharding(meta_runs, spawned):
    from lorafit.run.build import meta_build_blocker

    assert not spawned[0]["bf16"]["meta"] and not spawned[1]["bf16"]["meta"]
    config = yaml.safe_load(Path(meta_runs[1]["bf16"]).read_text())
    assert "frozen_dtype bfloat16" in meta_build_blocker(config, 2)
    assert meta_build_blocker(config, 1) == "not fsdp2"
    config["parallelism"] = {"component_key": "parallelism", "variant_key": "ddp", "config": {}}
    assert meta_build_blocker(config, 2) == "not fsdp2"


def test_lorafit_run_trains_like_one_process(meta_runs, spawned, tmp_path):
    from lorafit.run.runner import RunRequest, run

    _folder, configs = meta_runs
    overrides = ("settings.step_profile.local_train_micro_batch_size=2",)  # the same global batch on one process
    single = run(RunRequest(Path(configs["hf"]), tmp_path, experiment_id="one", overrides=overrides))
    two = Path(spawned[0]["run"])
    expected, got = metrics(single), metrics(two)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-5, rel=0)
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (single, two))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
