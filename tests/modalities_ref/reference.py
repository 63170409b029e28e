"""What the real Modalities (0.5.0, from the package index) computes, for the `modalities` test tier.

Runs in Modalities' own venv (scripts/install_modalities_env.sh: modalities 0.5.0 with transformers < 5), never in
lorafit's; the tests call it as a subprocess with one JSON request on stdin and read one JSON answer on stdout.
Every answer comes from Modalities' own code: its config loader and resolvers, its component factory and registry,
its data tools. Requests:

  {"op": "batches", "config": PATH, "loader": "train_dataloader", "world_size": W, "num_batches": K}
      -> {"dataset_len": N, "ranks": [[[sample index, ...] per micro-batch] per rank],
          "first_sample": [token ids of the first sample of rank 0's first batch]}
  {"op": "numbers", "config": PATH, "keys": [KEY, ...]}   -> {KEY: the number Modalities' component gives}
  {"op": "pack", "config": PATH}                       Modalities' `data pack_encoded_data CONFIG`
  {"op": "index", "src": PATH, "index": PATH}          Modalities' `data create_raw_index`
  {"op": "load_checkpoint", "config": PATH, "model": KEY}
      -> {"keys": [...], "sha256": {key: digest}}   a checkpointed model built by Modalities from the config
  {"op": "logits", "config": PATH, "model": KEY, "input_ids": [[...]], "lora": null or
   {"branch": "lora" | "lora_2", "r": R, "alpha": A, "target_layers": [...], "checkpoint": PATH}}
      -> {"sha256": {key: digest}, "logits": [...], "merged_logits": [...] (with lora)}
      the model KEY built by Modalities from the config (e.g. a checkpointed model: its strict torch loading), run
      through its own forward on the batch; with "lora", KEY is the Hugging Face model, converted by the branch's
      LoRA code (vendored: tests/modalities_ref/lora_branch/) and then given the checkpoint by Modalities' torch
      checkpoint loading (strict); "merged_logits" after the branch's eval(), which merges B A into the weights
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from pydantic import BaseModel


def _build(config_path: str, fields: dict[str, type], env: dict[str, str]) -> BaseModel:
    """Modalities' own build of the named top-level components of `config_path` (its loader, its factory)."""
    from modalities.config.component_factory import ComponentFactory
    from modalities.config.config import load_app_config_dict
    from modalities.registry.components import COMPONENTS
    from modalities.registry.registry import Registry

    os.environ.update(env)
    config = load_app_config_dict(Path(config_path), experiment_id="reference")
    model = type("Components", (BaseModel,), {"__annotations__": fields})
    return ComponentFactory(Registry(COMPONENTS)).build_components(config_dict=config, components_model_type=model)


def batches(request: dict) -> dict:
    from modalities.config.pydantic_if_types import PydanticLLMDataLoaderIFType

    world = int(request["world_size"])
    ranks, dataset_len, first = [], None, None
    for rank in range(world):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        loader = getattr(
            _build(request["config"], {request["loader"]: PydanticLLMDataLoaderIFType}, env), request["loader"]
        )
        dataset_len = len(loader.dataset)
        picked = []
        for i, indices in enumerate(loader.batch_sampler):
            if i == request["num_batches"]:
                break
            picked.append([int(x) for x in indices])
        ranks.append(picked)
        if rank == 0 and picked:
            sample = loader.dataset[picked[0][0]]
            first = [int(t) for t in next(iter(sample.values())).tolist()]
    return {"dataset_len": dataset_len, "ranks": ranks, "first_sample": first}


def numbers(request: dict) -> dict:
    built = _build(
        request["config"], dict.fromkeys(request["keys"], int), {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    )
    return {key: getattr(built, key) for key in request["keys"]}


def pack(request: dict) -> dict:
    from modalities.api import FileExistencePolicy, pack_encoded_data
    from modalities.config.config import load_app_config_dict

    pack_encoded_data(load_app_config_dict(Path(request["config"])), FileExistencePolicy.ERROR)
    return {}


def index(request: dict) -> dict:
    from modalities.api import create_raw_data_index

    create_raw_data_index(Path(request["src"]), Path(request["index"]))
    return {}


def load_checkpoint(request: dict) -> dict:
    from modalities.config.pydantic_if_types import PydanticPytorchModuleType

    built = _build(
        request["config"],
        {request["model"]: PydanticPytorchModuleType},
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"},
    )
    state = getattr(built, request["model"]).state_dict()
    digest = {
        k: hashlib.sha256(v.detach().float().contiguous().numpy().tobytes()).hexdigest() for k, v in state.items()
    }
    return {"keys": sorted(state), "sha256": digest}


def _digests(model) -> dict:
    return {
        k: hashlib.sha256(v.detach().float().contiguous().numpy().tobytes()).hexdigest()
        for k, v in model.state_dict().items()
    }


def _lora_branch(branch: str):
    """The vendored branch code, loaded by the tests' own loader (by path: this venv has no lorafit tests)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "support" / "lora_branch.py"
    spec = importlib.util.spec_from_file_location("lora_branch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_lora_branch(branch)


def logits(request: dict) -> dict:
    import torch
    from modalities.checkpointing.torch.torch_checkpoint_loading import TorchCheckpointLoading
    from modalities.config.config import PrecisionEnum
    from modalities.config.pydantic_if_types import PydanticPytorchModuleType

    built = _build(
        request["config"],
        {request["model"]: PydanticPytorchModuleType},
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"},
    )
    model = getattr(built, request["model"])
    lora = request.get("lora")
    if lora:
        utils = _lora_branch(lora["branch"]).utils
        model.huggingface_model = utils.convert_to_lora(
            model.huggingface_model, r=lora["r"], alpha=lora["alpha"], target_layers=lora["target_layers"]
        )
        loading = TorchCheckpointLoading(device=torch.device("cpu"), precision=PrecisionEnum.FP32)
        model = loading.load_model_checkpoint(model, Path(lora["checkpoint"]))
    ids = torch.tensor(request["input_ids"])
    answer = {"sha256": _digests(model)}
    with torch.no_grad():
        model.train(bool(lora))  # the branch's LoRA layers merge on eval(): first apart, then merged
        answer["logits"] = model({model.sample_key: ids})[model.prediction_key].tolist()
        if lora:
            model.eval()
            answer["merged_logits"] = model({model.sample_key: ids})[model.prediction_key].tolist()
    return answer


if __name__ == "__main__":
    request = json.load(sys.stdin)
    ops = {
        "batches": batches,
        "numbers": numbers,
        "pack": pack,
        "index": index,
        "load_checkpoint": load_checkpoint,
        "logits": logits,
    }
    answer = ops[request["op"]](request)
    json.dump(answer, sys.stdout)
