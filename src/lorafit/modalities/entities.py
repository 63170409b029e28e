"""modalities 0.5.0's run entities beside the `lora` branch's: `app_state/raw` (the model, optimizer and scheduler
as one entity) and `device_mesh/default` (the parallel degrees), mapped onto lorafit's one process group.

lorafit trains data-parallel over every process (FSDP2 or DDP, per the wrapped model's config), so a device mesh
is valid when its degrees describe exactly that: tensor, pipeline and context parallel degree 1, and
data_parallel_shard_degree x data_parallel_replicate_degree = the world size (Modalities resolves a -1 the same
way). With a replicate degree above 1 (HSDP) lorafit still shards over all ranks, as it does for
`sharding_strategy: HYBRID_SHARD`: the same gradients and updates, other communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_validator

from lorafit.config.registry import Component, ComponentConfig, register_component
from lorafit.errors import UserError
from lorafit.modalities.training import ModalitiesScheduler


class RawAppStateConfig(ComponentConfig):
    model: Component("model")
    optimizer: Component("optimizer")
    lr_scheduler: Component("scheduler") | None = None


@dataclass
class AppState:
    model: Any
    optimizer: Any
    lr_scheduler: Any


@register_component("app_state", "raw", RawAppStateConfig)
def build_raw_app_state(config: RawAppStateConfig) -> AppState:
    """The run's model, optimizer and scheduler (no scheduler: the optimizer's lr throughout)."""

    scheduler = config.lr_scheduler if config.lr_scheduler is not None else ModalitiesScheduler("dummy_lr", None)
    return AppState(config.model, config.optimizer, scheduler)


class DeviceMeshConfig(ComponentConfig):
    device_type: str = "cuda"
    data_parallel_replicate_degree: int = Field(1, ge=-1)
    data_parallel_shard_degree: int = Field(ge=-1)
    tensor_parallel_degree: int = Field(1, gt=0)
    pipeline_parallel_degree: int = Field(1, gt=0)
    context_parallel_degree: int = Field(1, gt=0)
    enable_loss_parallel: bool = False
    world_size: int = Field(gt=0)

    @model_validator(mode="after")
    def _degrees(self) -> DeviceMeshConfig:
        if 0 in (self.data_parallel_shard_degree, self.data_parallel_replicate_degree):
            raise ValueError("data_parallel_shard_degree and data_parallel_replicate_degree must be -1 or >= 1")
        if self.data_parallel_shard_degree == -1 and self.data_parallel_replicate_degree == -1:
            raise ValueError("at most one of data_parallel_replicate_degree and data_parallel_shard_degree can be -1")
        return self


@dataclass
class DeviceMesh:
    shard: int
    replicate: int
    world_size: int

    def check(self, world: int) -> None:
        if self.world_size != world:
            raise UserError(f"device_mesh.config.world_size: {self.world_size}, but the run has {world} process(es)")


@register_component("device_mesh", "default", DeviceMeshConfig)
def build_device_mesh(config: DeviceMeshConfig) -> DeviceMesh:
    """Modalities' data-parallel mesh as lorafit's process group (tensor/pipeline/context parallel refused)."""
    for key in ("tensor_parallel_degree", "pipeline_parallel_degree", "context_parallel_degree"):
        if getattr(config, key) != 1:
            raise UserError(
                f"{getattr(config, key)}: lorafit trains data-parallel only; valid: 1 "
                "(set data_parallel_shard_degree: -1 to shard over every process)",
                field=key,
            )
    if config.enable_loss_parallel:
        raise UserError(
            "loss parallelism needs tensor parallelism, which lorafit does not do; valid: false",
            field="enable_loss_parallel",
        )
    shard, replicate = config.data_parallel_shard_degree, config.data_parallel_replicate_degree
    if shard == -1:
        shard = config.world_size // replicate
    if replicate == -1:
        replicate = config.world_size // shard
    if shard * replicate != config.world_size:
        raise UserError(
            f"data_parallel_shard_degree {shard} x data_parallel_replicate_degree {replicate} != world_size "
            f"{config.world_size}; valid: data_parallel_shard_degree: -1 (every process)",
            field="data_parallel_shard_degree",
        )
    return DeviceMesh(shard, replicate, config.world_size)
