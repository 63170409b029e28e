"""lorafit against the real Modalities: modalities 0.5.0 from the package index, in a venv of its own
(scripts/install_modalities_env.sh: it imports only with transformers < 5), driven through
tests/modalities_ref/reference.py. Every expected value here is computed by Modalities' own code from the same
files and the same config; nothing is lorafit's reading of Modalities.

- the samples: the first 20 micro-batches of every rank for 1, 2 and 3 processes, with a dataset whose size is a
  multiple of every global batch and one whose size is not (torch's DistributedSampler permutes all N samples and
  drops a tail, so a lorafit that shuffled only the first whole batches trained other samples);
- the blocks: with reuse_last_target false, 0.5.0 cuts sequence_length tokens (the lora branch sequence_length + 1);
- the .idx and .pbin bytes of `pack_encoded_data`, padded (a document ending with the eod token) and not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modalities_ref import modalities_venv_python, reference

REPO = Path(__file__).resolve().parents[2]
TRAIN_PBIN = REPO / "data" / "modalities" / "chat_train.pbin"
MICRO = 2

pytestmark = pytest.mark.modalities


@pytest.fixture(scope="session")
def modalities_python() -> str:
    """The python of Modalities' own venv (made once, kept outside the repository). Under CI it must be there."""
    return modalities_venv_python()


def loader_config(sequence_length: int, *, seed: int = 0) -> dict:
    """A modalities 0.5.0 train data loader (settings.step_profile layout): the continuous packed dataset without
    overlap, torch's DistributedSampler, a batch sampler dropping the last incomplete batch."""
    ref = {"pass_type": "BY_REFERENCE"}
    return {
        "settings": {
            "cuda_env": {
                "local_rank": "${cuda_env:LOCAL_RANK}",
                "global_rank": "${cuda_env:RANK}",
                "world_size": "${cuda_env:WORLD_SIZE}",
            },
            "step_profile": {
                "gradient_accumulation_steps": 1,
                "local_train_micro_batch_size": MICRO,
                "sequence_length": sequence_length,
            },
        },
        "train_dataset": {
            "component_key": "dataset",
            "variant_key": "packed_mem_map_dataset_continuous",
            "config": {
                "raw_data_path": str(TRAIN_PBIN),
                "sequence_length": "${settings.step_profile.sequence_length}",
                "sample_key": "input_ids",
                "reuse_last_target": False,
            },
        },
        "train_dataloader": {
            "component_key": "data_loader",
            "variant_key": "default",
            "config": {
                "num_workers": 0,
                "pin_memory": False,
                "dataloader_tag": "train",
                "dataset": {"instance_key": "train_dataset", **ref},
                "batch_sampler": {
                    "component_key": "batch_sampler",
                    "variant_key": "default",
                    "config": {
                        "batch_size": "${settings.step_profile.local_train_micro_batch_size}",
                        "drop_last": True,
                        "sampler": {
                            "component_key": "sampler",
                            "variant_key": "distributed_sampler",
                            "config": {
                                "rank": "${settings.cuda_env.global_rank}",
                                "num_replicas": "${settings.cuda_env.world_size}",
                                "shuffle": True,
                                "seed": seed,
                                "dataset": {"instance_key": "train_dataset", **ref},
                            },
                        },
                    },
                },
                "collate_fn": {
                    "component_key": "collate_fn",
                    "variant_key": "gpt_2_llm_collator",
                    "config": {"sample_key": "input_ids", "target_key": "target_ids"},
                },
            },
        },
    }


def lorafit_batches(config: dict, world: int, num_batches: int, monkeypatch, tmp: Path) -> tuple[int, list, list]:
    """(N, [[sample indices] per micro-batch] per rank, the first sample's tokens) as lorafit's run draws them:
    the loader built by lorafit's Modalities components, the run's sampler (training/batches.train_sampler) over
    the whole dataset with the loader's epoch, micro-batches as the loop takes them."""
    from lorafit.components import load_builtin_components
    from lorafit.config.graph import ConfigGraph
    from lorafit.config.loader import load_config
    from lorafit.config.run_spec import RunSettings, StepProfile
    from lorafit.modalities.run import with_release
    from lorafit.training.batches import train_sampler

    load_builtin_components()
    ranks, first, n = [], None, None
    for rank in range(world):
        for name, value in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", rank)):
            monkeypatch.setenv(name, str(value))
        path = tmp / f"loader_{world}_{rank}.yaml"
        path.write_text(yaml.safe_dump(config))
        resolved = with_release(load_config(path), "0.5.0")
        loader = ConfigGraph(resolved).build("train_dataloader")
        data = loader.view(world, whole=True)
        n = len(data)
        settings = RunSettings(
            seed=loader.seed,
            step_profile=StepProfile(
                local_train_micro_batch_size=loader.micro_batch_size,
                gradient_accumulation_steps=1,
                sequence_length=config["settings"]["step_profile"]["sequence_length"],
            ),
        )
        sampler = train_sampler(n, settings, rank, world, loader.shuffle, loader.epoch_samples(world))
        stream = sampler.forever()
        batches = [[next(stream) for _ in range(loader.micro_batch_size)] for _ in range(num_batches)]
        ranks.append(batches)
        if rank == 0:
            first = data[batches[0][0]]["input_ids"].tolist()
    return n, ranks, first


@pytest.mark.parametrize("sequence_length", [116, 128], ids=["N_multiple_of_every_batch", "N_not_a_multiple"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_trains_the_samples_modalities_draws(
    modalities_python, sequence_length, world, tmp_path, monkeypatch
):
    config = loader_config(sequence_length)
    (tmp_path / "modalities.yaml").write_text(yaml.safe_dump(config))
    expected = reference(
        modalities_python,
        {
            "op": "batches",
            "config": str(tmp_path / "modalities.yaml"),
            "loader": "train_dataloader",
            "world_size": world,
            "num_batches": 20,
        },
    )
    n, ranks, first = lorafit_batches(config, world, 20, monkeypatch, tmp_path)
    assert n == expected["dataset_len"]  # 0.5.0's blocks of sequence_length tokens (reuse_last_target false)
    assert (n % (MICRO * world) == 0) == (sequence_length == 116)
    assert ranks == expected["ranks"]
    assert first == expected["first_sample"]


def test_a_modalities_run_samples_the_whole_dataset_with_the_loaders_epoch(tmp_path, monkeypatch):
    """The wiring of `lorafit run`: the Modalities layout hands the run the whole dataset and the loader's epoch
    (the shipped lora-branch config, built on the meta device)."""
    from lorafit.config.context import build_context
    from lorafit.data.pbin import read_pbin
    from lorafit.run.build import build_run, load_run_config

    for name, value in (("WORLD_SIZE", 3), ("RANK", 0), ("LOCAL_RANK", 0)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(REPO)
    overrides = (
        "settings.training.sequence_length=128",
        "settings.training.local_train_micro_batch_size=2",
        "evaluation_subscriber.config.mode=OFFLINE",
    )
    _, graph = load_run_config(REPO / "configs" / "modalities" / "config_lorem_ipsum_lora.yaml", overrides=overrides)
    with build_context(meta_device=True, load_weights=False, announce=False):
        built = build_run(graph, world_size=3)
    n = read_pbin(TRAIN_PBIN).num_tokens // 129  # the lora branch: blocks of sequence_length + 1
    assert len(built.train_dataset) == n
    assert built.samples_per_epoch == n // 3 // 2 * 2 * 3


def _prep(tmp: Path, tool: str, padded: bool) -> Path:
    """The seed's data-preparation config (configs/modalities/packed_dataset_config_lora_smol.yaml, which pads
    every document to 128 tokens with the eod token) or the same without padding, paths into `tmp/tool`."""
    folder = tmp / tool
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "configs" / "modalities" / "packed_dataset_config_lora_smol.yaml").read_text())
    src = folder / "chat_val.jsonl"
    src.write_bytes((REPO / "data" / "modalities" / "chat_val.jsonl").read_bytes())
    config["settings"].update(
        src_path=str(src), index_path=str(folder / "chat_val.idx"), dst_path=str(folder / "chat_val.pbin"), num_cpus=1
    )
    config["tokenizer"]["config"]["pretrained_model_name_or_path"] = str(REPO / "data" / "models" / "SmolLM2-135M")
    if not padded:
        config["tokenizer"]["config"].update(padding=False, truncation=False)
    path = folder / "prep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("padded", [True, False], ids=["padded_with_eod", "not_padded"])
def test_index_and_pbin_bytes_equal_modalities(modalities_python, smollm2_dir, padded, tmp_path):
    """`lorafit data create_raw_index` + `pack_encoded_data` (default: the current release's bytes) against
    modalities 0.5.0's own `create_raw_data_index` + `pack_encoded_data` on the same config."""
    from lorafit.cli import main

    theirs, ours = _prep(tmp_path, "modalities", padded), _prep(tmp_path, "lorafit", padded)
    reference(
        modalities_python,
        {"op": "index", "src": str(theirs.parent / "chat_val.jsonl"), "index": str(theirs.parent / "chat_val.idx")},
    )
    reference(modalities_python, {"op": "pack", "config": str(theirs)})
    assert main(["data", "create_raw_index", str(ours.parent / "chat_val.jsonl")]) == 0
    assert main(["data", "pack_encoded_data", str(ours)]) == 0
    for name in ("chat_val.idx", "chat_val.pbin"):
        assert (ours.parent / name).read_bytes() == (theirs.parent / name).read_bytes(), name
    # the lora branch's rule appends eod to every document: different bytes exactly where a document is padded
    (ours.parent / "chat_val.pbin").unlink()
    assert main(["data", "pack_encoded_data", str(ours), "--modalities_release", "lora_branch"]) == 0
    same = (ours.parent / "chat_val.pbin").read_bytes() == (theirs.parent / "chat_val.pbin").read_bytes()
    assert same is not padded


NUMBERS = {  # modalities 0.5.0's number conversions, each in its own spelling (num_ranks or dp_degree)
    "a": (
        "local_num_batches_from_num_samples",
        {"num_ranks": 3, "global_num_samples": 1001, "local_micro_batch_size": 2},
    ),
    "b": (
        "local_num_batches_from_num_tokens",
        {"num_ranks": 3, "global_num_tokens": 90001, "sequence_length": 128, "local_micro_batch_size": 2},
    ),
    # (num_steps_from_num_samples cannot be built in 0.5.0: its config wants num_ranks, its function dp_degree)
    "d": (
        "num_steps_from_num_tokens",
        {
            "dp_degree": 3,
            "local_micro_batch_size": 2,
            "global_num_tokens": 90001,
            "sequence_length": 128,
            "gradient_accumulation_steps": 4,
        },
    ),
    "e": (
        "num_tokens_from_num_steps",
        {
            "num_steps": 17,
            "dp_degree": 3,
            "local_micro_batch_size": 2,
            "sequence_length": 128,
            "gradient_accumulation_steps": 4,
        },
    ),
    "f": ("num_samples_from_num_tokens", {"num_tokens": 90001, "sequence_length": 128}),
}


def test_number_conversions_equal_modalities(modalities_python, tmp_path):
    """Steps and tokens from modalities 0.5.0's number_conversion components, dp_degree spelling included."""
    from lorafit.components import load_builtin_components
    from lorafit.config.graph import ConfigGraph

    config = {
        key: {"component_key": "number_conversion", "variant_key": variant, "config": values}
        for key, (variant, values) in NUMBERS.items()
    }
    (tmp_path / "numbers.yaml").write_text(yaml.safe_dump(config))
    expected = reference(
        modalities_python, {"op": "numbers", "config": str(tmp_path / "numbers.yaml"), "keys": list(NUMBERS)}
    )
    load_builtin_components()
    graph = ConfigGraph(config)
    assert {key: graph.build(key) for key in NUMBERS} == expected
