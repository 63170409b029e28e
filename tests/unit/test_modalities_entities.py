"""The entity sets of Modalities' versions (validated on the meta device, no weights read): the lora_2 branch's
config (number_conversion components inside settings, progress_subscriber) gives Modalities' step count computed
here from the .pbin; modalities 0.5.0's app_state/raw and device_mesh/default map onto the run, and a mesh lorafit
cannot honour is refused naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorafit.data.pbin import read_pbin
from lorafit.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "modalities" / "config_lorem_ipsum_lora.yaml"
LORA2 = REPO / "tests" / "fixtures" / "modalities" / "config_lorem_ipsum_lora_training.yaml"


def _validate(monkeypatch, config: Path, *overrides: str, world: int = 1) -> str:
    from lorafit.run.build import validate_config

    for name, value in (("WORLD_SIZE", world), ("RANK", 0), ("LOCAL_RANK", 0)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(REPO)
    return validate_config(config, overrides)


def _run_lines(validated: str) -> list[str]:
    """validate's lines about the run: without the config's path (line 1) and the machine's free memory now."""
    return [line for line in validated.splitlines()[1:] if not line.startswith("memory available here")]


@pytest.mark.usefixtures("smollm2_dir")  # the config reads the real SmolLM2 folder: `slow` (tests/conftest.py)
def test_lora2_steps_from_number_conversions_as_modalities(tmp_path, monkeypatch, caplog):
    text = LORA2.read_text()
    for old, new in (
        (
            "/raid/s3/opengptx/maxr/ogptx/modalities/data/fineweb/fineweb_edu_data/fineweb-edu-CC-MAIN_test.pbin",
            "data/modalities/chat_train.pbin",
        ),
        ("openGPT-X/Teuken-7B-sigma-instruct-commercial-v0.6", "data/models/SmolLM2-135M"),
    ):
        text = text.replace(old, new)
    path = tmp_path / "lora2.yaml"
    path.write_text(text)
    total, seq = len(read_pbin(REPO / "data/modalities/chat_train.pbin").tokens), 64
    samples = (total - (seq + 1)) // seq + 1  # PackedMemMapDatasetContinuous, the last target reused
    for world, acc in ((1, 1), (2, 3)):
        # num_tokens_from_packed_mem_map_dataset_continuous, then num_steps_from_num_tokens (lora_2's formulas)
        steps = samples // world // 1 // acc
        tokens = steps * world * 1 * seq * acc
        assert tokens // seq // world // 1 // acc == steps
        out = _validate(
            monkeypatch,
            path,
            f"settings.step_profile.sequence_length={seq}",
            f"settings.step_profile.gradient_accumulation_steps={acc}",
            "lora_model.config.target_layers=[q_proj,k_proj,v_proj,o_proj]",
            world=world,
        )
        assert f"Modalities config: {steps} steps on {world} process(es); global batch {acc * world} samples" in out
    # its enforce_last_step_* flags are false: Modalities warns, so does lorafit
    assert "settings.intervals.checkpointing_interval_in_steps: the last step will not be checkpointed" in caplog.text
    with pytest.raises(UserError, match=r"settings.training_progress.num_seen_steps: 3: Modalities' warm start"):
        seen = "settings.training_progress.num_seen_steps=3"
        _validate(
            monkeypatch,
            path,
            f"settings.step_profile.sequence_length={seq}",
            "lora_model.config.target_layers=[q_proj]",
            seen,
        )
    teuken = r"lora_model.config.target_layers\[0\]: 'q_attn' matches no module"  # its model's layer names
    with pytest.raises(UserError, match=teuken):
        _validate(monkeypatch, path, f"settings.step_profile.sequence_length={seq}")


def _app_state_config(tmp_path: Path, **mesh) -> Path:
    """The shipped config with modalities 0.5.0's app_state/raw and device_mesh/default entities."""
    config = yaml.safe_load(SHIPPED.read_text())
    ref = {"pass_type": "BY_REFERENCE"}
    config["model_state"] = {
        "component_key": "app_state",
        "variant_key": "raw",
        "config": {
            "model": {"instance_key": "wrapped_model", **ref},
            "optimizer": {"instance_key": "optimizer", **ref},
            "lr_scheduler": {"instance_key": "scheduler", **ref},
        },
    }
    config["app_state"] = {"instance_key": "model_state", **ref}
    config["device_mesh"] = {
        "component_key": "device_mesh",
        "variant_key": "default",
        "config": {
            "device_type": "cuda",
            "data_parallel_shard_degree": -1,
            "world_size": "${settings.cuda_env.world_size}",
            **mesh,
        },
    }
    path = tmp_path / "app_state.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.usefixtures("smollm2_dir")  # the config reads the real SmolLM2 folder: `slow` (tests/conftest.py)
def test_app_state_and_device_mesh_entities(tmp_path, monkeypatch):
    sizes = ("settings.training.sequence_length=128", "evaluation_subscriber.config.mode=OFFLINE")
    plain = _validate(monkeypatch, SHIPPED, *sizes, world=2)
    out = _validate(monkeypatch, _app_state_config(tmp_path), *sizes, world=2)
    assert _run_lines(out) == _run_lines(plain)  # the same run as with wrapped_model/optimizer/scheduler
    for mesh, message in (
        ({"tensor_parallel_degree": 2}, r"device_mesh.config.tensor_parallel_degree: 2: lorafit trains data-parallel"),
        ({"data_parallel_shard_degree": 3}, r"device_mesh.config.data_parallel_shard_degree: .* != world_size 2"),
        ({"world_size": 4}, r"device_mesh.config.world_size: 4, but the run has 2 process\(es\)"),
    ):
        with pytest.raises(UserError, match=message):
            _validate(monkeypatch, _app_state_config(tmp_path, **mesh), *sizes, world=2)
    config = yaml.safe_load(_app_state_config(tmp_path).read_text())
    config["model_state"]["variant_key"] = "dcp"
    (tmp_path / "dcp.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"model_state.variant_key: unknown variant_key 'dcp'.*valid: raw"):
        _validate(monkeypatch, tmp_path / "dcp.yaml", *sizes, world=2)


def _fsdp2_config(
    tmp_path: Path, precision: str, clipper_variant: str = "fsdp2", model_key: str = "model_parts", **extra
) -> Path:
    """The shipped config with modalities 0.5.0's model/fsdp2_wrapped, gradient_clipper/fsdp2 and device_mesh."""
    config = yaml.safe_load(_app_state_config(tmp_path).read_text())
    wrapped = config["wrapped_model"]
    mesh = {"instance_key": "device_mesh", "pass_type": "BY_REFERENCE"}
    wrapped["variant_key"] = "fsdp2_wrapped"
    wrapped["config"] = {
        "model": wrapped["config"]["model"],
        "block_names": wrapped["config"]["block_names"],
        "mixed_precision_settings": {"param_dtype": precision, "reduce_dtype": precision},
        "reshard_after_forward": True,
        "device_mesh": mesh,
        **extra,
    }
    clipper = config["gradient_clipper"]
    clipper["variant_key"] = clipper_variant
    model = clipper["config"]["wrapped_model"]
    clipper["config"] = {"norm_type": "P2_NORM", "device_mesh": mesh, **{key: model for key in model_key.split(",")}}
    if clipper_variant == "fsdp2":
        clipper["config"]["max_norm"] = 0.5
    path = tmp_path / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _built(monkeypatch, config: Path, *overrides: str):
    from lorafit.config.context import build_context
    from lorafit.run.build import build_run, load_run_config

    for name, value in (("WORLD_SIZE", 2), ("RANK", 0), ("LOCAL_RANK", 0)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(REPO)
    _config, graph = load_run_config(config, overrides=overrides)
    with build_context(meta_device=True, load_weights=False, announce=False):
        return build_run(graph)


@pytest.mark.usefixtures("smollm2_dir")  # the config reads the real SmolLM2 folder: `slow` (tests/conftest.py)
@pytest.mark.parametrize(("fsdp1", "fsdp2"), [("FP_32", "FP_32"), ("BF_16", "BF_16")])
def test_fsdp2_wrapped_and_clipper_resolve_as_fsdp_wrapped(tmp_path, monkeypatch, fsdp1, fsdp2):
    from lorafit.distributed.parallel import FSDP2Strategy

    sizes = ("settings.training.sequence_length=128", "evaluation_subscriber.config.mode=OFFLINE")
    old = _built(
        monkeypatch,
        SHIPPED,
        *sizes,
        f"wrapped_model.config.mixed_precision_settings={fsdp1}",
        "gradient_clipper.config.max_norm=0.5",
    )
    new = _built(monkeypatch, _fsdp2_config(tmp_path, fsdp2), *sizes)
    assert type(new.parallelism) is type(old.parallelism) is FSDP2Strategy
    assert new.parallelism.config == old.parallelism.config
    assert new.parallelism.config.mixed_precision == ("bf16" if fsdp2 == "BF_16" else "fp32")
    assert new.settings == old.settings and new.settings.gradient_clipping == 0.5
    assert new.step_plan == old.step_plan


def test_fsdp2_keys_are_modalities_050s():
    """lorafit's fsdp2 configs take the keys of the installed modalities 0.5.0's classes (FSDP2WrappedModelConfig read
    from its source: its module needs a transformers that still has LlamaTokenizerFast)."""
    import ast
    import importlib.util
    import typing

    from modalities.running_env.env_utils import FSDP2MixedPrecisionSettings, PyTorchDtypes
    from modalities.training.gradient_clipping import fsdp_gradient_clipper_config as clippers

    from lorafit.modalities import training

    source = Path(importlib.util.find_spec("modalities").origin).parent / "config" / "config.py"
    tree = ast.parse(source.read_text())
    wrapped = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FSDP2WrappedModelConfig")
    keys = {s.target.id for s in wrapped.body if isinstance(s, ast.AnnAssign)}
    assert keys == set(training.FSDP2WrappedConfig.model_fields)
    assert set(FSDP2MixedPrecisionSettings.model_fields) == set(training.FSDP2PrecisionConfig.model_fields)
    dtypes = typing.get_args(training.FSDP2PrecisionConfig.model_fields["reduce_dtype"].annotation)
    assert set(dtypes) == {d.name for d in PyTorchDtypes}
    # model_parts, and wrapped_model: its deprecated alias in Modalities
    for ours, theirs in (
        (training.FSDP2ClipperConfig, clippers.FSDP2GradientClipperConfig),
        (training.FSDP2LoggingOnlyConfig, clippers.FSDP2DummyGradientClipperConfig),
    ):
        assert set(ours.model_fields) == set(theirs.model_fields) | {"wrapped_model"}


@pytest.mark.usefixtures("smollm2_dir")  # the config reads the real SmolLM2 folder: `slow` (tests/conftest.py)
def test_fsdp2_clippers_and_keys(tmp_path, monkeypatch, caplog):
    sizes = ("settings.training.sequence_length=128", "evaluation_subscriber.config.mode=OFFLINE")
    path = _fsdp2_config(tmp_path, "FP_32")
    plain = _validate(monkeypatch, SHIPPED, *sizes, world=2)
    out = _validate(monkeypatch, path, *sizes, world=2)
    assert _run_lines(out) == _run_lines(plain)
    # fsdp2_logging_only with Modalities' deprecated alias wrapped_model: the norm logged, nothing clipped
    only = _built(monkeypatch, _fsdp2_config(tmp_path, "FP_32", "fsdp2_logging_only", "wrapped_model"), *sizes)
    assert only.settings.gradient_clipping is None
    caplog.set_level("INFO", logger="lorafit.modalities.training")
    _built(monkeypatch, _fsdp2_config(tmp_path, "BF_16", reshard_after_forward=False), *sizes)
    for key in ("mixed_precision_settings.reduce_dtype BF_16", "reshard_after_forward False"):
        assert f"model/fsdp2_wrapped {key}: not honoured; lorafit reduces gradients in fp32" in caplog.text
    for extra, message in (
        (
            {"sharding_strategy": "FULL_SHARD"},
            r"wrapped_model.config.sharding_strategy: unknown key 'sharding_strategy'; valid keys: block_names",
        ),
        ({"layers_per_fsdp_unit": 0}, r"wrapped_model.config.layers_per_fsdp_unit"),
    ):
        with pytest.raises(UserError, match=message):
            _validate(monkeypatch, _fsdp2_config(tmp_path, "FP_32", **extra), *sizes, world=2)
    with pytest.raises(UserError, match=r"wrapped_model.config.mixed_precision_settings.param_dtype: .*FP_16"):
        _validate(monkeypatch, _fsdp2_config(tmp_path, "FP_16"), *sizes, world=2)
    both = _fsdp2_config(tmp_path, "FP_32", "fsdp2", "model_parts,wrapped_model")
    with pytest.raises(UserError, match=r"gradient_clipper.config.*model_parts .*exactly once"):
        _validate(monkeypatch, both, *sizes, world=2)


def test_precision_is_read_through_model_initialized():
    """Modalities 0.5.0 initialises after sharding (model_initialized {model: fsdp2_wrapped}): the run's precision and
    sharding come from the fsdp block however deep it sits, not from the outermost model (it was fp32 silently).
    Decided from the checked graph's typed configs, not from the YAML dict."""
    from lorafit.components import load_builtin_components
    from lorafit.config.layouts import checked_graph
    from lorafit.modalities.sharding import translate, wrapped_model_block
    from lorafit.run.build import run_outline

    load_builtin_components()  # the checked graph knows Modalities' components

    ref = {"pass_type": "BY_REFERENCE"}
    mesh = {
        "component_key": "device_mesh",
        "variant_key": "default",
        "config": {"data_parallel_shard_degree": -1, "world_size": 1},
    }
    fsdp2 = {
        "component_key": "model",
        "variant_key": "fsdp2_wrapped",
        "config": {
            "model": {**ref, "instance_key": "model_raw"},
            "block_names": ["LlamaDecoderLayer"],
            "device_mesh": {**ref, "instance_key": "mesh"},
            "mixed_precision_settings": {"param_dtype": "BF_16", "reduce_dtype": "BF_16"},
        },
    }
    init = {
        "component_key": "model_initialization",
        "variant_key": "composed",
        "config": {"model_type": "gpt2", "weight_init_type": "plain", "mean": 0.0, "std": 0.02},
    }
    initialized = {
        "component_key": "model",
        "variant_key": "model_initialized",
        "config": {"model": {**ref, "instance_key": "sharded"}, "model_initializer": init},
    }
    raw = {"component_key": "model", "variant_key": "huggingface_pretrained_model", "config": {}}
    config = {"mesh": mesh, "model_raw": raw, "sharded": fsdp2, "wrapped_model": initialized, "train_dataloader": {}}

    def block(config):
        found = wrapped_model_block(checked_graph(config))
        return found.path if found is not None else None

    assert block(config) == "sharded"
    translated, block_names = translate(config)
    assert translated["parallelism"]["config"]["mixed_precision"] == "bf16"
    assert block_names == ("sharded", ["LlamaDecoderLayer"])
    assert translated["sharded"] == {**ref, "instance_key": "model_raw"}  # the block: the model it wraps
    app = {
        "component_key": "app_state",
        "variant_key": "raw",
        "config": {"model": {**ref, "instance_key": "wrapped_model"}},
    }
    assert block({**config, "app_state": app}) == "sharded"
    fsdp1 = {
        "model": {**ref, "instance_key": "model_raw"},
        "sync_module_states": True,
        "block_names": [],
        "mixed_precision_settings": "BF_16",
        "sharding_strategy": "NO_SHARD",
    }
    ddp = {"component_key": "model", "variant_key": "fsdp_wrapped", "config": fsdp1}
    assert translate({**config, "sharded": ddp})[0]["parallelism"]["variant_key"] == "ddp"
    assert run_outline({**config, "app_state": app}).parallelism == "fsdp2"
    assert run_outline({**config, "sharded": ddp}).parallelism == "ddp"
    # no fsdp block at all: the outermost model, as before
    assert block({"model_raw": raw, "wrapped_model": raw, "train_dataloader": {}}) == "wrapped_model"


@pytest.mark.usefixtures("smollm2_dir")  # the config reads the real SmolLM2 folder: `slow` (tests/conftest.py)
def test_the_fsdp_block_is_translated_and_its_block_names_still_checked(monkeypatch):
    """fsdp_wrapped is not built and taken apart: the checked config holds the model it wrapped and lorafit's
    parallelism entity; its block_names are checked against the built model, by their YAML path."""
    from lorafit.run.build import load_run_config

    sizes = ("settings.training.sequence_length=128", "evaluation_subscriber.config.mode=OFFLINE")
    monkeypatch.chdir(REPO)
    config, graph = load_run_config(SHIPPED, overrides=sizes)
    assert config["wrapped_model"]["variant_key"] == "fsdp_wrapped"  # as written
    assert graph.config["wrapped_model"] == config["wrapped_model"]["config"]["model"]
    assert graph.config["parallelism"]["component_key"] == "parallelism"
    with pytest.raises(UserError, match=r"wrapped_model.config.block_names: \['GPT2Block'\] are not module classes"):
        _built(monkeypatch, SHIPPED, *sizes, "wrapped_model.config.block_names=[GPT2Block]")


def test_an_fsdp_block_outside_a_modalities_config_is_refused(tmp_path, tiny_model_dir):
    """In a lorafit config the sharding is the parallelism entity: fsdp_wrapped there would shard nothing."""
    from lorafit.run.build import build_run, load_run_config
    from tiny_runs import tiny_run_config

    config = tiny_run_config(tiny_model_dir, cache_path=tmp_path / "cache")
    config["model"] = {
        "component_key": "model",
        "variant_key": "fsdp_wrapped",
        "config": {
            "model": config["model"],
            "sync_module_states": True,
            "block_names": [],
            "mixed_precision_settings": "FP_32",
            "sharding_strategy": "FULL_SHARD",
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"model/fsdp_wrapped is Modalities' sharding .* set parallelism"):
        build_run(load_run_config(path)[1])
