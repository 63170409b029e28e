"""What happens when things go wrong: a corpus of bad inputs through the real CLI, interrupted runs, untrusted files.

The corpus is one table (`CASES`): each case writes its files into a fresh folder, names the command line, and
lists fragments of the one error message it must produce. Every case must end with exit code 2, exactly one
`error:` line naming the YAML path or the file and what would be valid, no traceback, and every file the folder
held before the command byte-identical afterwards (most cases may not even add a file). Most cases run
in-process (`lorafit.cli.main`, fast); a few run as `python -m lorafit` to show the same end to end, and one with
`--debug` to show that the traceback is then there.

Then: SIGKILL of `lorafit run` at several points while it writes a checkpoint, resumed with `--resume_from latest`,
ends with the same losses and the bitwise-same adapter as an uninterrupted run; a damaged latest checkpoint is
skipped with a warning and the one before it is used; no source file loads untrusted data in a way that runs code.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli_run import lorafit
from lorafit.cli import main
from tiny_runs import adapter_tensors, checkpointed_model, losses, tiny_config

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "lorafit"


# ------------------------------------------------------------------------------------------------ case context
@dataclass
class Ctx:
    """What a case's `setup` gets: its own empty folder, the shared tiny model, and the finished baseline run."""

    tmp: Path
    model_dir: Path
    request: pytest.FixtureRequest

    def config(self, **kw) -> dict:
        return tiny_config(self.model_dir, self.tmp, **kw)

    def write_config(self, config: dict | str, name: str = "config.yaml") -> Path:
        """Write the config; "{tmp}" and "{model}" in it stand for the case folder and the tiny model folder."""
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        path = self.tmp / name
        path.write_text(text.replace("{tmp}", str(self.tmp)).replace("{model}", str(self.model_dir)))
        return path

    def run_args(self, config_path: Path, *extra: str) -> list[str]:
        return [
            "run",
            "--config_file_path",
            str(config_path),
            "--experiments_root_path",
            str(self.tmp / "exp"),
            "--experiment_id",
            "run",
            *extra,
        ]

    @property
    def baseline(self) -> Baseline:
        return self.request.getfixturevalue("baseline")

    def copy_baseline(self) -> Path:
        """The finished baseline run copied to tmp/exp/run; its config (unchanged) at tmp/config.yaml."""
        run_dir = self.tmp / "exp" / "run"
        shutil.copytree(self.baseline.run_dir, run_dir)
        return run_dir

    def state_dict(self) -> dict:
        from safetensors.torch import load_file

        return load_file(self.model_dir / "model.safetensors")


@dataclass(frozen=True)
class Baseline:
    config: dict
    config_path: Path
    root: Path
    run_dir: Path


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]  # writes the case's files under ctx.tmp, returns the command line
    expect: tuple[str, ...]  # fragments of the error message ("{tmp}" stands for the case folder)
    adds_files: bool = False  # a run may create its run folder before it fails; nothing else may change


# ------------------------------------------------------------------------------------------------ case builders
def at(config: dict, path: str) -> tuple[Any, str]:
    """(the container, the last key) of a dotted path such as `model.config.r`."""
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node, last


def put(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        node, key = at(config, path)
        node[key] = copy.deepcopy(value)

    return mutate


def drop(path: str) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        node, key = at(config, path)
        del node[key]

    return mutate


def rename(path: str, new_key: str) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        node, key = at(config, path)
        node[new_key] = node.pop(key)

    return mutate


def validate(*mutations: Callable[[dict], None]) -> Callable[[Ctx], list[str]]:
    """`lorafit validate` on the tiny run config changed by `mutations`."""

    def setup(ctx: Ctx) -> list[str]:
        config = ctx.config()
        for mutate in mutations:
            mutate(config)
        return ["validate", "--config_file_path", str(ctx.write_config(config))]

    return setup


def validate_text(text: str) -> Callable[[Ctx], list[str]]:
    """`lorafit validate` on a config file with exactly this text ({tmp} and {model} filled in)."""

    def setup(ctx: Ctx) -> list[str]:
        return ["validate", "--config_file_path", str(ctx.write_config(textwrap.dedent(text)))]

    return setup


def validate_bytes(content: bytes) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        (ctx.tmp / "config.yaml").write_bytes(content)
        return ["validate", "--config_file_path", str(ctx.tmp / "config.yaml")]

    return setup


def checkpointed(ctx: Ctx, checkpoint_path: Path) -> dict:
    """The tiny run config with its base model built from config.json and its weights from `checkpoint_path`."""
    config = ctx.config()
    config["architecture"] = {
        "component_key": "model",
        "variant_key": "huggingface_from_config",
        "config": {"config_path": str(ctx.model_dir)},
    }
    config["base_model"] = checkpointed_model("architecture", checkpoint_path)
    return config


def run_with_checkpoint(make_file: Callable[[Ctx, Path], None], name: str = "model.bin"):
    """`lorafit run` whose base weights come from a file written by `make_file` (weights load at build time)."""

    def setup(ctx: Ctx) -> list[str]:
        path = ctx.tmp / name
        make_file(ctx, path)
        return ctx.run_args(ctx.write_config(checkpointed(ctx, path)))

    return setup


def validate_with_checkpoint(
    make_file: Callable[[Ctx, Path], None] | None, name: str = "model.bin", *mutations: Callable[[dict], None]
):
    """`lorafit validate` of the checkpointed config (under validate the file must exist; nothing is read)."""

    def setup(ctx: Ctx) -> list[str]:
        path = ctx.tmp / name
        if make_file:
            make_file(ctx, path)
        config = checkpointed(ctx, path)
        for mutate in mutations:
            mutate(config)
        return ["validate", "--config_file_path", str(ctx.write_config(config))]

    return setup


def data_pack(input_name: str, content: bytes | None, tokenizer: str = "{model}", *extra: str):
    """`lorafit data pack` of a file holding `content` (None: no file)."""

    def setup(ctx: Ctx) -> list[str]:
        source = ctx.tmp / input_name
        if content is not None:
            source.write_bytes(content)
        tok = tokenizer.replace("{model}", str(ctx.model_dir)).replace("{tmp}", str(ctx.tmp))
        return [
            "data",
            "pack",
            "--input",
            str(source),
            "--tokenizer",
            tok,
            "--output",
            str(ctx.tmp / "packed"),
            "--no_progress",
            *extra,
        ]

    return setup


def run_with_dataset(input_name: str, content: bytes, **dataset_config: Any):
    """`lorafit run` whose train_dataset is the raw file `content` (tokenized at build time)."""

    def setup(ctx: Ctx) -> list[str]:
        source = ctx.tmp / input_name
        source.write_bytes(content)
        config = ctx.config()
        config["train_dataset"]["config"].update(path=str(source), **dataset_config)
        return ctx.run_args(ctx.write_config(config))

    return setup


# --- files for the cases ---
class Payload:
    """Unpickling this creates the file `path`: what a malicious checkpoint would do with `os.system`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def torch_save(value: Callable[[Ctx, Path], Any]):
    def make(ctx: Ctx, path: Path) -> None:
        import torch

        torch.save(value(ctx, path), path)

    return make


def truncated(make: Callable[[Ctx, Path], None], keep: float = 0.5):
    def make_truncated(ctx: Ctx, path: Path) -> None:
        make(ctx, path)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return make_truncated


def safetensors_file(ctx: Ctx, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(ctx.state_dict(), str(path))


def reshaped(ctx: Ctx, _path: Path) -> dict:
    sd = ctx.state_dict()
    key = "model.layers.1.self_attn.q_proj.weight"
    sd[key] = sd[key][:, :16].contiguous()
    return sd


def without_key(ctx: Ctx, _path: Path) -> dict:
    sd = ctx.state_dict()
    del sd["model.layers.0.mlp.up_proj.weight"]
    return sd


def model_folder(ctx: Ctx, mutate: Callable[[Path], None]) -> Path:
    folder = ctx.tmp / "my_model"
    shutil.copytree(ctx.model_dir, folder)
    mutate(folder)
    return folder


def run_with_model_folder(mutate: Callable[[Path], None]):
    def setup(ctx: Ctx) -> list[str]:
        folder = model_folder(ctx, mutate)
        config = ctx.config()
        config["base_model"]["config"]["model_name_or_path"] = str(folder)
        return ctx.run_args(ctx.write_config(config))

    return setup


def truncate_file(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])

    return mutate


def generate_with_adapter(mutate_adapter: Callable[[Path], None]):
    """`lorafit generate` with the baseline run's adapter, changed by `mutate_adapter`."""

    def setup(ctx: Ctx) -> list[str]:
        adapter = ctx.tmp / "adapter"
        shutil.copytree(ctx.baseline.run_dir / "adapter", adapter)
        mutate_adapter(adapter)
        return [
            "generate",
            "--model",
            str(ctx.model_dir),
            "--adapter",
            str(adapter),
            "--prompt",
            "hi",
            "--max_new_tokens",
            "2",
        ]

    return setup


def wrong_shape_adapter(adapter: Path) -> None:
    from safetensors.torch import load_file, save_file

    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = tensors[key][:2].contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})


# --- runs for the cases ---
def resume(
    mutate_run: Callable[[Path], None] = lambda run_dir: None,
    *mutations: Callable[[dict], None],
    resume_from: str = "latest",
    extra: tuple[str, ...] = (),
):
    """`lorafit run --resume_from ...` of a copy of the finished baseline run, with the config changed."""

    def setup(ctx: Ctx) -> list[str]:
        run_dir = ctx.copy_baseline()
        mutate_run(run_dir)
        config = copy.deepcopy(ctx.baseline.config)
        for mutate in mutations:
            mutate(config)
        target = resume_from.replace("{run}", str(run_dir)).replace("{tmp}", str(ctx.tmp))
        return ctx.run_args(ctx.write_config(config), "--resume_from", target, *extra)

    return setup


def resume_fresh(resume_from: str, *extra: str):
    """`lorafit run --resume_from ...` where no run exists yet."""

    def setup(ctx: Ctx) -> list[str]:
        config_path = ctx.write_config(ctx.config())
        return [
            "run",
            "--config_file_path",
            str(config_path),
            "--experiments_root_path",
            str(ctx.tmp / "exp"),
            "--resume_from",
            resume_from,
            *extra,
        ]

    return setup


def corrupt(relative: str) -> Callable[[Path], None]:
    """Flip bytes in the middle of a file of the run (what a bad disk or a partial copy does)."""

    def mutate(run_dir: Path) -> None:
        file = run_dir / relative
        data = bytearray(file.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
        file.write_bytes(bytes(data))

    return mutate


def corrupt_all_checkpoints(run_dir: Path) -> None:
    for step in run_dir.glob("checkpoints/step_*"):
        corrupt(f"checkpoints/{step.name}/__0_0.distcp")(run_dir)


def remove(relative: str) -> Callable[[Path], None]:
    return lambda run_dir: (run_dir / relative).unlink()


def evil_trainer_state(run_dir: Path) -> None:
    """A checkpoint whose trainer_state.pt would run code, with its checksum updated to match (a crafted file)."""
    import torch

    step = run_dir / "checkpoints" / "step_000004"
    torch.save({"step": Payload(run_dir.parent.parent / "PWNED")}, step / "trainer_state.pt")
    record = json.loads((step / "COMPLETE").read_text())
    record["files"]["trainer_state.pt"] = hashlib.sha256((step / "trainer_state.pt").read_bytes()).hexdigest()
    (step / "COMPLETE").write_text(json.dumps(record))


def existing_run_folder(ctx: Ctx) -> list[str]:
    (ctx.tmp / "exp" / "run").mkdir(parents=True)
    (ctx.tmp / "exp" / "run" / "notes.txt").write_text("mine")
    return ctx.run_args(ctx.write_config(ctx.config(steps=1)))


def merge_into_existing(ctx: Ctx) -> list[str]:
    out = ctx.tmp / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return ["merge", "--base", str(ctx.model_dir), "--adapter", str(ctx.tmp), "--output_dir", str(out)]


NOT_UTF8 = '{"text": "caf\xe9"}\n'.encode("latin-1")
PYTHON_TAG = """\
    model: !!python/object/apply:builtins.open ["{tmp}/PWNED", "w"]
    """

# ---------------------------------------------------------------------------------------------------- the corpus
# fmt: off
# one case to a few lines (name, mutation, expected message): the corpus reads as a table; unfolded it would not
CASES = [
    # --- the config file itself
    Case("yaml_syntax", validate_text("settings: {seed: 1\nmodel: x\n"),
         ("config.yaml: invalid YAML at line", "column")),
    Case("yaml_tab_indent", validate_text("settings:\n\tseed: 1\n"), ("config.yaml: invalid YAML at line 2",)),
    Case("yaml_empty", validate_text(""), ("config.yaml: the config file is empty",)),
    Case("yaml_top_level_list", validate_text("- model\n- train_dataset\n"), ("top level must be a mapping",)),
    Case("yaml_not_utf8", validate_bytes(b"settings: {note: caf\xe9}\n"), ("config.yaml: not a UTF-8 text file",)),
    Case("config_file_missing", lambda ctx: ["validate", "--config_file_path", str(ctx.tmp / "nope.yaml")],
         ("config file not found", "nope.yaml")),
    Case("python_object_tag", validate_text(PYTHON_TAG),
         ("config.yaml: invalid YAML at line 1", "python/object/apply:builtins.open",
          "configs may not contain Python tags")),
    Case("python_name_tag", validate_text("model: !!python/name:os.system\n"),
         ("python/name:os.system", "configs may not contain Python tags")),
    # --- names: unknown keys and variants, missing references, cycles
    Case("unknown_top_level_key", validate(rename("settings", "setings")),
         ("setings: unknown top-level key 'setings' (did you mean 'settings'?)", "the top level holds settings")),
    Case("run_entity_misspelt", validate(rename("model", "modle")),
         ("model: a run needs a top-level 'model' entity",)),
    Case("unknown_component_key", validate(put("optimizer.component_key", "optimiser")),
         ("error: optimizer.component_key: unknown component_key 'optimiser' (did you mean 'optimizer'?)",
          "valid: ")),
    Case("reference_to_unknown_component_key", validate(
         put("my_optimizer", {"component_key": "optimiser", "variant_key": "adamw", "config": {}}),
         put("optimizer", {"instance_key": "my_optimizer", "pass_type": "BY_REFERENCE"})),
         ("error: my_optimizer.component_key: unknown component_key 'optimiser' (did you mean 'optimizer'?)",)),
    Case("import_path_as_component_key", validate(put("optimizer.component_key", "os.system")),
         ("error: optimizer.component_key: unknown component_key 'os.system'", "valid: ")),
    Case("hydra_target_key", validate(put("optimizer", {"_target_": "torch.optim.SGD", "lr": 0.1})),
         ("optimizer", "expected a 'optimizer' component")),
    Case("unknown_variant_key", validate(put("scheduler.variant_key", "cosin")),
         ("scheduler.variant_key: unknown variant_key 'cosin'", "did you mean 'cosine'", "valid: ")),
    Case("missing_variant_key", validate(drop("scheduler.variant_key")),
         ("scheduler: component 'scheduler' needs a variant_key; valid: ", "cosine")),
    Case("unknown_component_config_key", validate(rename("model.config.r", "rank")),
         ("model.config.rank: unknown key 'rank'", "valid keys: ", "model.config.r: missing required key")),
    Case("unknown_key_next_to_component_key", validate(rename("model.config", "configs")),
         ("model.configs: unknown key 'configs' next to component_key (did you mean 'config'?)",)),
    Case("unknown_settings_key", validate(put("settings.step_profile.micro_batch", 2)),
         ("settings.step_profile.micro_batch: unknown key 'micro_batch' (did you mean 'local_train_micro_batch_size'?)",
          "valid keys: gradient_accumulation_steps, local_train_micro_batch_size, sequence_length")),
    Case("missing_reference", validate(put("model.config.model.instance_key", "base_modle")),
         ("error: model.config.model.instance_key: reference to missing instance 'base_modle'",
          "(did you mean 'base_model'?)",
          "components defined at the top level: ")),
    Case("reference_without_pass_type", validate(drop("model.config.model.pass_type")),
         ("model.config.model: a reference needs pass_type: BY_REFERENCE or BY_VALUE",)),
    Case("reference_bad_pass_type", validate(put("model.config.model.pass_type", "BY_POINTER")),
         ("model.config.model.pass_type: invalid pass_type 'BY_POINTER'; valid: BY_REFERENCE, BY_VALUE",)),
    Case("reference_extra_key", validate(put("model.config.model.config", {})),
         ("model.config.model: a reference has exactly the keys instance_key and pass_type; unexpected: config",)),
    Case("reference_to_non_component", validate(put("model.config.model.instance_key", "settings")),
         ("error: model.config.model.instance_key: 'settings' is not a component",)),
    Case("reference_cycle", validate(put("base_model", {"component_key": "model", "variant_key": "lora", "config": {
         "r": 2, "alpha": 2, "target_layers": ["q_proj"],
         "model": {"instance_key": "model", "pass_type": "BY_VALUE"}}})),
         ("model.config.model: reference cycle: base_model -> model -> base_model",)),
    Case("wrong_component_kind", validate(put("model.config.model", {"instance_key": "tokenizer",
         "pass_type": "BY_REFERENCE"})), ("model.config.model", "expected a 'model' component, got 'tokenizer/")),
    Case("missing_run_entity", validate(drop("train_dataset"), put("eval_datasets", {})),
         ("train_dataset: a run needs a top-level 'train_dataset' entity",)),
    Case("missing_interpolation", validate(put("model.config.r", "${settings.lora_rank}")),
         ("model.config.r: cannot resolve", "settings.lora_rank")),
    Case("interpolation_unclosed", validate(put("model.config.alpha", "${settings.alpha")),
         ("error: model.config.alpha: invalid value", "an interpolation is ${path.to.key}")),
    Case("unknown_env_resolver_name", validate(put("settings.note", "${lorafit_env:run_name}")),
         ("settings.note: cannot resolve", "lorafit_env knows experiment_id")),
    # --- types and ranges
    Case("r_wrong_type", validate(put("model.config.r", "four")), ("model.config.r", "valid integer", "'four'")),
    Case("r_zero", validate(put("model.config.r", 0)), ("model.config.r", "greater than or equal to 1", "got 0")),
    Case("r_negative", validate(put("model.config.r", -8)), ("model.config.r", "greater than or equal to 1")),
    Case("alpha_zero", validate(put("model.config.alpha", 0)), ("model.config.alpha", "greater than 0")),
    Case("alpha_negative", validate(put("model.config.alpha", -16)), ("model.config.alpha", "greater than 0")),
    Case("dropout_one", validate(put("model.config.dropout", 1.0)), ("model.config.dropout", "less than 1")),
    Case("init_unknown", validate(put("model.config.init", "xavier")),
         ("model.config.init", "'kaiming'", "'gaussian'")),
    Case("target_layers_empty", validate(put("model.config.target_layers", [])),
         ("model.config.target_layers", "at least 1 item")),
    Case("target_layers_not_a_list", validate(put("model.config.target_layers", "q_proj")),
         ("model.config.target_layers", "valid list")),
    Case("target_layers_no_match", validate(put("model.config.target_layers", ["q_proj", "qproj"])),
         ("model.config.target_layers[1]: 'qproj' matches no module (did you mean 'q_proj'?)",
          "LoRA-capable layers here: ")),
    Case("target_layers_bad_regex", validate(put("model.config.target_layers", ["re:layers.(0"])),
         ("model.config.target_layers[0]: 're:layers.(0' is not a valid regular expression",)),
    Case("target_layers_unwrappable", validate(put("model.config.target_layers", ["input_layernorm"])),
         ("model.config.target_layers[0]: 'input_layernorm' matched", "which LoRA cannot wrap; supported: ")),
    Case("sequence_length_above_model_max", validate(put("settings.step_profile.sequence_length", 4096)),
         ("settings.step_profile.sequence_length: 4096 is above the model's maximum sequence length 256",)),
    Case("sequence_length_wrong_type", validate(put("settings.step_profile.sequence_length", [128])),
         ("settings.step_profile.sequence_length", "valid integer")),
    Case("micro_batch_size_zero", validate(put("settings.step_profile.local_train_micro_batch_size", 0)),
         ("settings.step_profile.local_train_micro_batch_size", "greater than or equal to 1", "got 0")),
    Case("gradient_accumulation_zero", validate(put("settings.step_profile.gradient_accumulation_steps", 0)),
         ("settings.step_profile.gradient_accumulation_steps", "greater than or equal to 1")),
    Case("no_training_target", validate(put("settings.training_target", {})),
         ("settings.training_target", "set num_target_steps, num_target_tokens or num_target_epochs")),
    Case("epochs_beside_steps", validate(put("settings.training_target", {"num_target_epochs": 1,
         "num_target_steps": 3})), ("settings.training_target", "num_target_epochs goes alone")),
    Case("epochs_zero", validate(put("settings.training_target", {"num_target_epochs": 0})),
         ("settings.training_target.num_target_epochs", "greater than 0")),
    Case("chat_template_unknown", validate(put("tokenizer.config.chat_template", "chatm")),
         ("tokenizer.config.chat_template: unknown chat template 'chatm' (did you mean 'chatml'?)",
          "valid: tokenizer, chatml, llama3, plain, or the path of a Jinja template file")),
    Case("chat_template_file_missing", validate(put("tokenizer.config.chat_template", "templates/mine.jinja")),
         ("tokenizer.config.chat_template: no such file: templates/mine.jinja",)),
    Case("learning_rate_negative", validate(put("optimizer.config.lr", -0.001)),
         ("optimizer.config.lr", "greater than 0")),
    Case("checkpoint_device_unknown", validate_with_checkpoint(torch_save(lambda ctx, p: ctx.state_dict()), "model.bin",
         put("base_model.config.checkpoint_loading.config.device", "gpu")),
         ("base_model.config.checkpoint_loading.config.device", "unknown device 'gpu'", "cpu, cuda")),
    Case("checkpoint_precision_unknown", validate_with_checkpoint(torch_save(lambda ctx, p: ctx.state_dict()),
         "model.bin", put("base_model.config.checkpoint_loading.config.precision", "FP_8")),
         ("base_model.config.checkpoint_loading.config.precision", "FP_8")),
    # --- files named by the config
    Case("model_folder_missing", validate(put("base_model.config.model_name_or_path", "{tmp}/no_model")),
         ("base_model.config.model_name_or_path: model folder not found: {tmp}/no_model",)),
    Case("model_folder_without_config_json", lambda ctx: validate(put("base_model.config.model_name_or_path",
         str(model_folder(ctx, lambda f: (f / "config.json").unlink()))))(ctx),
         ("base_model.config.model_name_or_path", "is not a Hugging Face model folder: it has no config.json")),
    Case("tokenizer_folder_missing", validate(put("tokenizer.config.path", "/nonexistent/tokenizer")),
         ("tokenizer.config.path: tokenizer folder not found: /nonexistent/tokenizer",)),
    Case("tokenizer_folder_empty", lambda ctx: validate(put("tokenizer.config.path", str(ctx.tmp)))(ctx),
         ("tokenizer.config.path: no tokenizer in", "tokenizer.json", "it holds: config.yaml")),
    Case("dataset_file_missing", validate(put("train_dataset.config.path", "/nonexistent/train.txt")),
         ("train_dataset.config.path: file not found: /nonexistent/train.txt",)),
    Case("checkpoint_missing", validate_with_checkpoint(None, "missing.bin"),
         ("base_model.config.checkpoint_path: weights file not found", "missing.bin")),
    Case("checkpoint_empty", run_with_checkpoint(lambda ctx, p: p.write_bytes(b"")),
         ("base_model.config.checkpoint_path", "model.bin: the file is empty"), adds_files=True),
    Case("checkpoint_truncated", run_with_checkpoint(truncated(torch_save(lambda ctx, p: ctx.state_dict()))),
         ("base_model.config.checkpoint_path", "model.bin: not a readable torch state dict (truncated or corrupt?)"),
         adds_files=True),
    Case("checkpoint_truncated_safetensors", run_with_checkpoint(truncated(safetensors_file), "model.safetensors"),
         ("base_model.config.checkpoint_path", "not a valid safetensors file (truncated or corrupt?)"),
         adds_files=True),
    Case("checkpoint_wrong_shape", run_with_checkpoint(torch_save(reshaped)),
         ("base_model.config.checkpoint_path", "1 shape mismatches",
          "model.layers.1.self_attn.q_proj.weight: file (32, 16) vs model (32, 32)"), adds_files=True),
    Case("checkpoint_missing_tensor", run_with_checkpoint(torch_save(without_key)),
         ("base_model.config.checkpoint_path", "1 missing (in the model, not in the file)",
          "model.layers.0.mlp.up_proj.weight"), adds_files=True),
    Case("checkpoint_not_a_state_dict", run_with_checkpoint(torch_save(lambda ctx, p: list(ctx.state_dict().values()))),
         ("base_model.config.checkpoint_path", "holds a list, expected a state dict"), adds_files=True),
    Case("checkpoint_pickle_runs_code",
         run_with_checkpoint(torch_save(lambda ctx, p: {"w": Payload(p.parent / "PWNED")})),
         ("base_model.config.checkpoint_path", "refused to load", "weights_only=True"), adds_files=True),
    Case("model_folder_truncated_safetensors", run_with_model_folder(truncate_file("model.safetensors")),
         ("base_model.config.model_name_or_path: cannot load the model in",), adds_files=True),
    # --- data files
    Case("data_input_missing", data_pack("train.txt", None), ("input file not found", "train.txt")),
    Case("data_empty_text", data_pack("train.txt", b"\n\n  \n"), ("train.txt: no documents",)),
    Case("data_empty_jsonl", data_pack("train.jsonl", b""), ("train.jsonl: no documents",)),
    Case("data_jsonl_not_utf8", data_pack("train.jsonl", b'{"text": "ok"}\n' + NOT_UTF8),
         ("train.jsonl:2: not valid UTF-8", "save the file as UTF-8")),
    Case("data_jsonl_malformed", data_pack("train.jsonl", b'{"text": "ok"}\n{"text": "unclosed}\n'),
         ("train.jsonl:2: not valid JSON (Invalid control character at column 20)",)),
    Case("data_jsonl_not_objects", data_pack("train.jsonl", b'["a", "b"]\n'),
         ("train.jsonl:1: expected a JSON object per line, got array",)),
    Case("data_jsonl_missing_text_field", data_pack("train.jsonl", b'{"body": "hello"}\n'),
         ("train.jsonl:1: no 'text' field", "'body'", "--jsonl_field")),
    Case("data_jsonl_text_field_later_missing", data_pack("train.jsonl", b'{"text": "a"}\n{"txt": "b"}\n'),
         ("train.jsonl:2: no 'text' field (the record's fields: 'txt')",)),
    Case("data_tokenizer_folder_missing", data_pack("train.txt", b"hello\n", "{tmp}/no_tokenizer"),
         ("tokenizer folder not found", "no_tokenizer")),
    Case("data_tokenizer_folder_empty", data_pack("train.txt", b"hello\n", "{tmp}"),
         ("no tokenizer in", "it has no tokenizer.json")),
    Case("data_output_exists", lambda ctx: ((ctx.tmp / "packed.bin").write_bytes(b"mine"),
         data_pack("train.txt", b"hello\n")(ctx))[1], ("packed.bin already exists; pass --overwrite",)),
    Case("dataset_in_run_empty", run_with_dataset("train.txt", b"\n"),
         ("train_dataset.config", "train.txt: no documents"), adds_files=True),
    Case("dataset_in_run_jsonl_missing_field", run_with_dataset("train.jsonl", b'{"body": "x"}\n'),
         ("train_dataset.config", "train.jsonl:1: no 'text' field"), adds_files=True),
    Case("dataset_shorter_than_one_sequence", run_with_dataset("train.txt", b"Lorem ipsum.\n"),
         ("lorem.bin has 8 tokens, fewer than one block of sequence_length + 1 = 33",),
         adds_files=True),
    # --- adapters
    Case("adapter_wrong_shape", generate_with_adapter(wrong_shape_adapter),
         ("adapter_model.safetensors", "lora_A", "(2, 32)")),
    Case("adapter_truncated", generate_with_adapter(truncate_file("adapter_model.safetensors")),
         ("adapter_model.safetensors",)),
    Case("adapter_without_config", generate_with_adapter(lambda a: (a / "adapter_config.json").unlink()),
         ("--adapter", "has no adapter_config.json")),
    Case("merge_into_non_empty_folder", merge_into_existing,
         ("--output_dir", "merged exists and is not empty; choose a new folder")),
    # --- runs: existing folders, resuming
    Case("run_folder_exists", existing_run_folder, ("run folder already exists", "never overwrites a run")),
    Case("resume_with_changed_config", resume(lambda d: None, put("optimizer.config.lr", 0.01),
         put("model.config.target_layers", ["q_proj", "k_proj", "v_proj"])),
         ("refusing to resume", "optimizer.config.lr: 0.003 -> 0.01", "model.config.target_layers", "k_proj",
          "--allow_config_change")),
    Case("resume_corrupted_checkpoint_named", resume(corrupt("checkpoints/step_000004/__0_0.distcp"),
         resume_from="{run}/checkpoints/step_000004"),
         ("cannot resume from", "step_000004: file __0_0.distcp does not match its checksum"), adds_files=True),
    Case("resume_incomplete_checkpoint_named", resume(remove("checkpoints/step_000004/COMPLETE"),
         resume_from="{run}/checkpoints/step_000004"),
         ("cannot resume from", "incomplete (no COMPLETE marker"), adds_files=True),
    Case("resume_every_checkpoint_corrupted", resume(corrupt_all_checkpoints),
         ("--resume_from latest: no complete checkpoint under",), adds_files=True),
    Case("resume_crafted_trainer_state", resume(evil_trainer_state),
         ("trainer_state.pt", "refused to load"), adds_files=True),
    Case("resume_changed_lora_shape_with_override", resume(lambda d: None, put("model.config.r", 8),
         put("settings.training_target.num_target_steps", 5), extra=("--allow_config_change",)),
         ("cannot resume from", "step_000004: it does not fit this run's trainable parameters",
          "Size mismatch", "lora_A", "another LoRA r or target_layers"), adds_files=True),
    Case("resume_changed_targets_with_override", resume(lambda d: None,
         put("model.config.target_layers", ["q_proj", "k_proj", "v_proj"]),
         put("settings.training_target.num_target_steps", 5), extra=("--allow_config_change",)),
         ("cannot resume from", "it does not fit this run's trainable parameters", "k_proj"), adds_files=True),
    Case("resume_missing_path", resume(resume_from="{tmp}/exp/nope"),
         ("--resume_from:", "nope does not exist; pass 'latest', a run folder or a checkpoint folder")),
    Case("resume_not_a_run_folder", resume(resume_from="{tmp}"),
         ("is neither a run folder (with checkpoints/) nor a checkpoint folder",)),
    Case("resume_run_without_resolved_config", resume(remove("config.resolved.yaml")),
         ("is not a lorafit run folder: config.resolved.yaml is missing",)),
    Case("resume_latest_nothing_to_resume", resume_fresh("latest"),
         ("--resume_from latest: no run with checkpoints under",)),
    Case("resume_latest_unknown_experiment", resume_fresh("latest", "--experiment_id", "nope"),
         ("--resume_from latest: no run folder", "nope")),
]
# fmt: on
CASE_BY_ID = {c.id: c for c in CASES}


# ------------------------------------------------------------------------------------------------ running cases
def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` -> the sha256 of its bytes ('<dir>' for folders)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(folder.rglob("*"))
    }


def check_outcome(case: Case, ctx: Ctx, code: int, err: str, before: dict[str, str], after: dict[str, str]) -> None:
    assert code == 2, f"exit code {code}\n{err}"
    assert "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    message = err[err.index("error:") :]
    for fragment in case.expect:
        assert fragment.replace("{tmp}", str(ctx.tmp)) in message, f"{fragment!r} not in:\n{message}"
    assert "?/?" not in message, "a problem reported twice: once where it is, once where it is used"
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"changed or removed: {changed}"
    if not case.adds_files:
        assert sorted(after) == sorted(before), f"added: {sorted(set(after) - set(before))}"
    assert not any("PWNED" in name for name in after), "a file's pickled code ran"


@pytest.fixture
def ctx(tmp_path, tiny_model_dir, request) -> Ctx:
    return Ctx(tmp_path, tiny_model_dir, request)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir) -> Baseline:
    """One uninterrupted 4-step run, a checkpoint after every step (the last two kept)."""
    root = tmp_path_factory.mktemp("baseline")
    config = tiny_config(tiny_model_dir, root, steps=4, checkpoint_every=1)
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    args = [
        "run",
        "--config_file_path",
        str(config_path),
        "--experiments_root_path",
        str(root / "exp"),
        "--experiment_id",
        "straight",
    ]
    assert main(args) == 0
    run_dir = root / "exp" / "straight"
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    return Baseline(config, config_path, root / "exp", run_dir)


def test_the_corpus_is_large_and_names_are_unique():
    assert len(CASES) >= 40
    assert len(CASE_BY_ID) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_error_and_touches_nothing(case: Case, ctx: Ctx, capsys):
    argv = case.setup(ctx)
    before = snapshot(ctx.tmp)
    capsys.readouterr()
    code = main(argv)
    _out, err = capsys.readouterr()
    check_outcome(case, ctx, code, err, before, snapshot(ctx.tmp))


def lorafit_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return lorafit(*argv, timeout=300)


@pytest.mark.parametrize("case_id", ["yaml_syntax", "r_zero", "checkpoint_pickle_runs_code", "data_jsonl_not_utf8"])
def test_end_to_end_exit_code_and_no_traceback(case_id: str, ctx: Ctx):
    case = CASE_BY_ID[case_id]
    argv = case.setup(ctx)
    before = snapshot(ctx.tmp)
    proc = lorafit_cli(argv)
    check_outcome(case, ctx, proc.returncode, proc.stderr, before, snapshot(ctx.tmp))


def test_debug_shows_the_traceback(ctx: Ctx):
    case = CASE_BY_ID["yaml_syntax"]
    argv = case.setup(ctx)
    proc = lorafit_cli(["--debug", *argv])
    assert proc.returncode not in (0, 2)  # the exception left the program: Python's exit code
    assert "Traceback (most recent call last)" in proc.stderr
    assert "lorafit.errors.ConfigError" in proc.stderr and case.expect[0] in proc.stderr
    debug_late = lorafit_cli([*argv, "--debug"])  # accepted anywhere on the line
    assert "Traceback (most recent call last)" in debug_late.stderr


# ------------------------------------------------------------------------------------------------ killed runs
# The child is `lorafit run` itself, with one function of the checkpoint writer wrapped so that it stops at a chosen
# point of writing checkpoint `step` and says so: the SIGKILL then lands exactly there, however slow the machine.
CHILD = textwrap.dedent(
    """
    import sys, time
    import lorafit.checkpoint.state as state

    point, name = sys.argv[1], "step_%06d" % int(sys.argv[2])

    def stall(where):
        print("KILL ME", where, flush=True)
        time.sleep(600)

    if point == "after_tensors_before_trainer_state":
        import torch.distributed.checkpoint as dcp
        real_save = dcp.save
        def save(state_dict, *, checkpoint_id, **kw):
            result = real_save(state_dict, checkpoint_id=checkpoint_id, **kw)
            if checkpoint_id.endswith(name + ".tmp"):
                stall(checkpoint_id)
            return result
        dcp.save = save
    elif point == "before_complete_marker":
        real_fsync = state._fsync
        def fsync(path):
            real_fsync(path)
            if path.name == "COMPLETE.part" and path.parent.name == name + ".tmp":
                stall(path)
        state._fsync = fsync
    elif point == "before_pruning":
        real_prune = state._prune
        def prune(run_dir, keep_last, keep):
            if keep.name == name:
                stall(keep)
            return real_prune(run_dir, keep_last, keep)
        state._prune = prune

    from lorafit.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)


def kill_run(point: str, step: int, argv: list[str], checkpoints: Path) -> str:
    """Start `lorafit run` (argv), SIGKILL it at `point` of writing checkpoint `step`; returns its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, point, str(step), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output: list[str] = []
    try:
        if point == "tmp_folder_appears":  # no stall: kill as soon as the folder is seen, wherever the write is
            tmp = checkpoints / f"step_{step:06d}.tmp"
            deadline = time.time() + 300
            while not tmp.exists() and child.poll() is None and time.time() < deadline:
                time.sleep(0.001)
            os.kill(child.pid, signal.SIGKILL)
            output.append(child.stdout.read())
        else:
            for line in child.stdout:
                output.append(line)
                if line.startswith("KILL ME"):
                    os.kill(child.pid, signal.SIGKILL)
                    break
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)
    text = "".join(output)
    assert child.returncode == -signal.SIGKILL, text
    return text


def test_killed_at_several_points_of_writing_checkpoints_then_resumed_equals_uninterrupted(baseline, tmp_path, capsys):
    """One run, SIGKILLed four times (each time resumed with `--resume_from latest` and killed again further on), at
    four points of writing a checkpoint; the fifth start finishes it. Losses and adapter equal the baseline's."""
    from lorafit.checkpoint.state import find_latest

    root = tmp_path / "exp"
    argv = [
        "run",
        "--config_file_path",
        str(baseline.config_path),
        "--experiments_root_path",
        str(root),
        "--experiment_id",
        "killed",
    ]
    resume_argv = [*argv, "--resume_from", "latest"]
    checkpoints = root / "killed" / "checkpoints"

    # 1. fresh run, killed in step 2's checkpoint: DCP tensors written; trainer state, RNG and COMPLETE not yet
    output = kill_run("after_tensors_before_trainer_state", 2, argv, checkpoints)
    tmp = checkpoints / "step_000002.tmp"
    assert any(tmp.glob("*.distcp")) and not (tmp / "trainer_state.pt").exists(), output
    assert not (checkpoints / "step_000002").exists()
    assert find_latest(root / "killed") == checkpoints / "step_000001"

    # 2. resumed from step 1, killed in step 3's checkpoint: every file and COMPLETE.part written, COMPLETE not yet
    output = kill_run("before_complete_marker", 3, resume_argv, checkpoints)
    assert "resumed from" in output and "step_000001 (step 1)" in output, output
    tmp = checkpoints / "step_000003.tmp"
    assert (tmp / "COMPLETE.part").is_file() and (tmp / "trainer_state.pt").is_file(), output
    assert not (tmp / "COMPLETE").exists() and not (checkpoints / "step_000002.tmp").exists()
    assert find_latest(root / "killed") == checkpoints / "step_000002"

    # 3. resumed from step 2, killed once step 3's checkpoint is complete and in place, before older ones are pruned
    output = kill_run("before_pruning", 3, resume_argv, checkpoints)
    assert "step_000002 (step 2)" in output, output
    assert (checkpoints / "step_000001").is_dir() and find_latest(root / "killed") == checkpoints / "step_000003"

    # 4. resumed from step 3, killed as soon as step_000004.tmp appears: wherever in the write the signal lands
    output = kill_run("tmp_folder_appears", 4, resume_argv, checkpoints)
    assert "step_000003 (step 3)" in output, output
    assert not (root / "killed" / "adapter").exists(), "killed too late to test anything"

    # 5. the last start finishes the run
    capsys.readouterr()
    assert main(resume_argv) == 0
    assert re.search(r"resumed from \S+step_00000[34] \(step [34]\)", capsys.readouterr().out)
    assert losses(root / "killed") == losses(baseline.run_dir)
    a, b = adapter_tensors(baseline.run_dir), adapter_tensors(root / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key
    assert not list(checkpoints.glob("*.tmp")), "an interrupted write was not cleaned up"


def test_damaged_latest_checkpoint_is_skipped_with_a_warning_and_kept(baseline, tmp_path, capsys):
    root = tmp_path / "exp"
    run_dir = root / "straight"
    shutil.copytree(baseline.run_dir, run_dir)
    corrupt("checkpoints/step_000004/__0_0.distcp")(run_dir)
    damaged = (run_dir / "checkpoints" / "step_000004" / "__0_0.distcp").read_bytes()

    capsys.readouterr()
    code = main(
        [
            "run",
            "--config_file_path",
            str(baseline.config_path),
            "--experiments_root_path",
            str(root),
            "--experiment_id",
            "straight",
            "--resume_from",
            "latest",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "warning: skipping checkpoint" in err
    assert "step_000004: file __0_0.distcp does not match its checksum; trying the previous one" in err
    assert re.search(r"resumed from \S+step_000003 \(step 3\)", out), out
    assert losses(run_dir) == losses(baseline.run_dir)
    a, b = adapter_tensors(baseline.run_dir), adapter_tensors(run_dir)
    assert all(a[key].equal(b[key]) for key in a)
    # the damaged checkpoint is set aside, never deleted: the user may still want to look at it
    set_aside = list((run_dir / "checkpoints").glob("step_000004.superseded-*"))
    assert len(set_aside) == 1 and (set_aside[0] / "__0_0.distcp").read_bytes() == damaged


# ------------------------------------------------------------------------------------------------ untrusted files
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


FORBIDDEN_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "marshal.loads",
    "marshal.load",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.load_all",
    "yaml.unsafe_load_all",
    "eval",
    "exec",
    "__import__",
    "shelve.open",
    "jsonpickle.decode",
}


def test_no_source_file_loads_data_in_a_way_that_can_run_code():
    """An audit of every call in src/lorafit: pickles only through torch.load(weights_only=True), YAML only safely,
    no eval/exec, no trust_remote_code, and imports only of lorafit's own modules (a config names registered
    components; it can never make lorafit import something)."""
    problems = []
    for file in sorted(SRC.rglob("*.py")):
        where = file.relative_to(SRC)
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            line = f"{where}:{node.lineno} {name}"
            if name in FORBIDDEN_CALLS:
                problems.append(f"{line}: forbidden")
            if name == "torch.load" and not _is_true(keywords.get("weights_only")):
                problems.append(f"{line}: without weights_only=True")
            if name in ("np.load", "numpy.load") and "allow_pickle" in keywords:
                problems.append(f"{line}: allow_pickle")
            if "trust_remote_code" in keywords and not (
                isinstance(keywords["trust_remote_code"], ast.Constant) and keywords["trust_remote_code"].value is False
            ):
                problems.append(f"{line}: trust_remote_code")
            if name.endswith("import_module"):
                arg = node.args[0] if node.args else None
                own = (
                    isinstance(arg, ast.JoinedStr)
                    and isinstance(arg.values[0], ast.Constant)
                    and str(arg.values[0].value).startswith("lorafit.")
                )
                if not own and str(where) != "components.py":
                    problems.append(f"{line}: imports a module not known to be lorafit's own")
    assert not problems, "\n".join(problems)

    from lorafit.components import BUILTIN_COMPONENT_MODULES

    assert all(m.startswith("lorafit.") for m in BUILTIN_COMPONENT_MODULES)


def test_the_config_loader_is_safe_yaml():
    """yaml.SafeLoader refuses every Python tag before anything is constructed."""
    from lorafit.config.loader import read_yaml
    from lorafit.config.strict_yaml import _StrictLoader
    from lorafit.errors import ConfigError

    assert "load_yaml_text(" in (SRC / "config" / "loader.py").read_text()
    assert issubclass(_StrictLoader, yaml.SafeLoader)
    for tag in (
        "!!python/object/apply:os.system ['true']",
        "!!python/name:os.system",
        "!!python/module:os",
        "!!python/object/new:subprocess.Popen [['true']]",
    ):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lorafit_tag_{os.getpid()}.yaml"
        try:
            path.write_text(f"model: {tag}\n")
            with pytest.raises(ConfigError, match="invalid YAML"):
                read_yaml(path)
        finally:
            path.unlink(missing_ok=True)
