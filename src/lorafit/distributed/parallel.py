"""Data parallelism as components: `parallelism/none`, `parallelism/ddp`, `parallelism/fsdp2`.

    parallelism:
      component_key: parallelism
      variant_key: fsdp2              # or ddp, none
      config:
        mixed_precision: auto         # auto (default): the fastest here (bf16 on bf16 GPUs and AMX CPUs, else
                                      # fp32), said in the log | fp32 | bf16: GPU bf16 params + fp32 reduce,
                                      # CPU bf16 autocast
        activation_checkpointing: true
        compile: auto                 # torch.compile each decoder block; auto (default): where the run is long
                                      # enough to pay for compiling (distributed/speed.py) | true | false
        load_after_sharding: true     # fsdp2 only: meta-device build, each rank reads only its shards (default)

The builder returns a strategy; the training loop calls `strategy.wrap(model, env)` once. The setup order is
fixed and the same for every strategy (torchtune / torchtitan's order):

    build (meta device: fsdp2 on several processes) -> inject LoRA -> freeze -> [wrap:] activation checkpointing
    -> compile -> shard -> load weights (each rank its shards) -> init adapters (the run's seed)

Under ddp, none, or fsdp2 on one process the model arrives with its weights and adapters. Under fsdp2 on several
processes `lorafit run` builds it on the meta device (lorafit/run/build.py) and `fill_weights` loads each rank's
shards of the base and initialises the adapters after sharding, so no rank holds the whole model. Decoder
blocks are the classes named by the model's `_no_split_modules` (Hugging Face's list of modules that must not
be split across devices).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lorafit.config.registry import ComponentConfig, register_component
from lorafit.console import info, warn
from lorafit.distributed.env import DistEnv
from lorafit.distributed.speed import SpeedPlan, plan_speed
from lorafit.errors import UserError
from lorafit.frozen.linear import has_low_precision_frozen
from lorafit.lora import adapter_state_dict
from lorafit.models.wrappers import unwrap


class ParallelismConfig(ComponentConfig):
    """How the model is replicated or sharded over the processes of the run."""

    mixed_precision: Literal["fp32", "bf16", "auto"] = Field(
        "auto", description="auto: bf16 where it is faster (bf16 GPUs, AMX CPUs), else fp32; said in the log"
    )
    activation_checkpointing: bool = False
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile each decoder block; auto: where the run is long enough for the measured "
        "compile time to pay back (distributed/speed.py), said in the log",
    )


class FSDP2Config(ParallelismConfig):
    """fsdp2's settings: those of every strategy, and where the weights are loaded."""

    load_after_sharding: bool = Field(
        True,
        description="build the model on the meta device and let each rank read only its shards of the weights "
        "after sharding (lorafit run on several processes); false: every rank loads the whole model first",
    )


class Strategy:
    """No parallelism: the model on this process's device. Base class of the others."""

    name = "none"

    def __init__(self, config: ParallelismConfig | None = None):
        self.config = config or ParallelismConfig()
        self._plan: SpeedPlan | None = None  # precision and compile resolved for the device and the run's length

    def plan(self, env: DistEnv, tokens_per_process: int | None) -> SpeedPlan:
        """Resolve `mixed_precision` and `compile` (auto: said in the log) for a run of `tokens_per_process`
        training tokens on each process; once, before `wrap`."""
        if self._plan is None:
            self._plan = plan_speed(self.config.mixed_precision, self.config.compile, env.device, tokens_per_process)
        return self._plan

    def precision(self, env: DistEnv) -> str:
        return self.plan(env, None).precision

    def wrap(
        self, model: nn.Module, env: DistEnv, fill_weights: Callable[[nn.Module], None] | None = None
    ) -> nn.Module:
        """Prepare `model` for training on `env` (checkpointing, compile, device, sharding); returns what to call."""
        plan = self.plan(env, None)  # resolved (and said) once, before anything runs; the loop plans first
        blocks = decoder_blocks(model)
        if self.config.activation_checkpointing:
            apply_activation_checkpointing(blocks)
        if plan.compile:
            for block in blocks:
                block.compile()  # in place: parameter names do not change (no `_orig_mod.`)
        model = self._distribute(model, env, blocks)
        if fill_weights is not None:
            fill_weights(unwrap(model))  # the Hugging Face model, by its own parameter names
        return model

    def _distribute(self, model: nn.Module, env: DistEnv, blocks: list[nn.Module]) -> nn.Module:
        return _materialize(model, env.device)

    def autocast(self, env: DistEnv) -> contextlib.AbstractContextManager:
        """The context the forward runs in: bf16 autocast where parameters stay fp32."""
        if self.precision(env) == "bf16":
            return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Context of one micro-batch's forward + backward; `sync=False` skips the gradient reduction."""
        yield

    def describe(self) -> str:
        c, plan = self.config, self._plan
        precision = plan.precision if plan else c.mixed_precision
        compile_ = plan.compile if plan else c.compile
        return (
            f"{self.name} (precision {precision}, activation checkpointing {c.activation_checkpointing}, "
            f"compile {compile_})"
        )


class DDPStrategy(Strategy):
    """DistributedDataParallel: full replicas, gradients all-reduced (averaged) after each backward."""

    name = "ddp"

    def _distribute(self, model: nn.Module, env: DistEnv, blocks: list[nn.Module]) -> nn.Module:
        model = _materialize(model, env.device)
        if not env.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # frozen base weights get no gradient hooks; every adapter is used in every step (find_unused: off)
        return DistributedDataParallel(model, device_ids=device_ids)

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if sync or not hasattr(model, "no_sync"):
            yield
        else:
            with model.no_sync():  # accumulate locally; the last micro-batch's backward reduces the sum
                yield


class FSDP2Strategy(Strategy):
    """`fully_shard` each decoder block, then the root, over a 1-D mesh of all processes."""

    name = "fsdp2"

    def _distribute(self, model: nn.Module, env: DistEnv, blocks: list[nn.Module]) -> nn.Module:
        if not env.distributed:
            info("parallelism fsdp2 on one process: nothing to shard, training unsharded")
            return _materialize(model, env.device)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if has_low_precision_frozen(model):
            raise UserError(
                "frozen_dtype (model/lora) stores frozen weights in another dtype than the adapters, and FSDP2 "
                "all-gathers each block's parameters in one dtype: use parallelism ddp or none with frozen_dtype, "
                "or drop frozen_dtype to shard with fsdp2"
            )
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        policy = MixedPrecisionPolicy()
        if self.precision(env) == "bf16" and env.device.type == "cuda":
            # bf16 compute and all-gathers; gradients reduced in fp32 (adapter updates are small numbers)
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if not blocks:
            warn(f"{type(model).__name__} names no decoder blocks (_no_split_modules): sharding the model as one unit")
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        # the root keeps its parameters (embeddings, final norm, tied head) gathered from forward to backward
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=env.device)
        return model

    def autocast(self, env: DistEnv) -> contextlib.AbstractContextManager:
        if env.distributed and env.device.type == "cuda":
            return contextlib.nullcontext()  # the MixedPrecisionPolicy casts parameters already
        return super().autocast(env)

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module, sync: bool) -> Iterator[None]:
        setter = getattr(model, "set_requires_gradient_sync", None)
        if setter is not None:
            setter(sync)  # without sync, unsharded gradients accumulate; reduce-scatter once per step
        yield


def _materialize(model: nn.Module, device: torch.device) -> nn.Module:
    if any(p.is_meta for p in model.parameters()):
        return model.to_empty(device=device)
    return model.to(device)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules whose class is in the model's `_no_split_modules` (e.g. LlamaDecoderLayer)."""

    model = unwrap(model)
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or module is model:
            continue
        if type(module).__name__ in names:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in backward (non-reentrant: keeps gradients of adapters whose
    inputs, the frozen base's outputs, do not require grad; the composable API keeps parameter names)."""
    from torch.distributed._composable import checkpoint

    if not blocks:
        raise UserError("activation_checkpointing needs decoder blocks, but the model names none (_no_split_modules)")
    for block in blocks:
        checkpoint(block)


def gather_adapter_state_dict(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """The full adapter (PEFT key names, CPU tensors) on rank 0, `{}` on other ranks. Collective: all ranks call.

    Under FSDP2 each rank holds a slice of every adapter matrix; the full state dict gathers them. It also holds
    frozen tied parameters (lm_head.weight) even with ignore_frozen_params, so adapter keys are picked explicitly.
    """

    if not env.distributed:
        return adapter_state_dict(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    full = get_model_state_dict(model, options=options)
    return adapter_state_dict(full) if env.is_main else {}


def gather_full_state_dict(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, unsharded, on CPU; rank 0 only (`{}` elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not env.distributed:
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if env.is_main else {}


def default_strategy(env: DistEnv) -> Strategy:
    """fsdp2 under torchrun, none on one process (what a config without `parallelism` gets)."""
    return FSDP2Strategy() if env.world_size > 1 else Strategy()


@register_component("parallelism", "none", ParallelismConfig)
def build_none(config: ParallelismConfig) -> Strategy:
    """One process, the model on its device (CUDA if present)."""
    return Strategy(config)


@register_component("parallelism", "ddp", ParallelismConfig)
def build_ddp(config: ParallelismConfig) -> DDPStrategy:
    """DistributedDataParallel replicas (gloo on CPU, nccl on CUDA)."""
    return DDPStrategy(config)


@register_component("parallelism", "fsdp2", FSDP2Config)
def build_fsdp2(config: FSDP2Config) -> FSDP2Strategy:
    """FSDP2: fully_shard each decoder block (from _no_split_modules), then the root."""
    return FSDP2Strategy(config)
