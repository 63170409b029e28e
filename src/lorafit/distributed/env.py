"""The process group, from torchrun's environment: gloo on CPU, nccl on CUDA, nothing at all for one process.

`init_distributed()` reads RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT, read by torch itself).
Without them the run is one process and no process group is created; every collective helper on `DistEnv`
then does the one-process thing, so callers never branch on "is distributed".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lorafit.console import info
from lorafit.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: one process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group exists (torchrun, even with one process): collectives and sharding are possible."""
        return self.backend is not None and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` from rank `src` on every rank (pickled: small objects only)."""
        if not self.distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def on_main(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` run on rank 0 only, its result (or its UserError) given to every rank: a user error on
        rank 0 stops every rank with the same message, and no rank goes on alone or waits for ever."""
        outcome: tuple[str, Any] | None = None
        error: UserError | None = None
        if self.is_main:
            try:
                outcome = ("ok", fn(*args))
            except UserError as caught:
                error, outcome = caught, ("error", caught.problems)
        outcome = self.broadcast_object(outcome)
        if error is not None:
            raise error  # itself: its `field`s still get the YAML path of the component being built
        if outcome[0] == "error":
            raise UserError("", problems=outcome[1])
        return outcome[1]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place and returned (on this rank's device, as collectives need)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def destroy(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


RENDEZVOUS_TIMEOUT_ENV = "LORAFIT_RENDEZVOUS_TIMEOUT"  # seconds; without torchrun only


def _rendezvous(rank: int, world_size: int) -> dist.TCPStore:
    """The store at MASTER_ADDR:MASTER_PORT, once all `world_size` processes joined, or a UserError after the
    timeout. torchrun's agent guarantees the peers exist; WORLD_SIZE/RANK/MASTER_* set by hand, or stale in a
    shell, do not, and torch would wait silently for 30 minutes."""
    from datetime import timedelta

    addr, port = os.environ["MASTER_ADDR"], _int_env("MASTER_PORT", 0)
    timeout = _int_env(RENDEZVOUS_TIMEOUT_ENV, 120)
    role = "to join this process" if rank == 0 else f"at the rank-0 process, {addr}:{port}"
    info(
        f"WORLD_SIZE={world_size} RANK={rank} MASTER_ADDR={addr} MASTER_PORT={port} are set (not by torchrun): "
        f"waiting up to {timeout} s for the other {world_size - 1} process(es) {role} "
        f"({RENDEZVOUS_TIMEOUT_ENV} changes the wait)",
        all_ranks=True,
    )
    try:
        return dist.TCPStore(
            addr, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout), wait_for_workers=True
        )
    except (RuntimeError, ValueError) as error:  # DistStoreError / DistNetworkError are RuntimeErrors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"process group: WORLD_SIZE={world_size} RANK={rank} MASTER_ADDR={addr} MASTER_PORT={port} are set, but "
            f"the other processes did not join within {timeout} s ({reason}). Start several processes with "
            "torchrun, or unset WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT to run one"
        ) from None


def current_env() -> DistEnv:
    """The `DistEnv` of the process group this process is already in (one process when there is none); creates
    nothing. For code a run reaches without being handed its DistEnv, such as a dataset builder. The device is
    the current CUDA device under nccl, else the CPU (what collectives on objects need)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    rank = dist.get_rank()
    return DistEnv(
        rank=rank,
        local_rank=_int_env("LOCAL_RANK", rank),
        world_size=dist.get_world_size(),
        device=device,
        backend=backend,
    )


def init_distributed(device: str | None = None) -> DistEnv:
    """The run's `DistEnv`; creates the process group under torchrun or when WORLD_SIZE > 1 (idempotent).

    `device`: "cpu" forces CPU even where CUDA is present; None picks cuda:LOCAL_RANK if CUDA is available.
    """
    world_size = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local_rank = _int_env("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is not a rank of WORLD_SIZE={world_size}")
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise UserError("a CUDA device was requested but torch sees none")
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)  # nccl needs each rank on its own device before the group forms
    else:
        dev = torch.device("cpu")
    backend = None
    # torchrun sets TORCHELASTIC_RUN_ID and MASTER_ADDR: a group even for one process, so that fsdp2 on one
    # GPU really runs FSDP2 (its mixed-precision policy); plain `python` with no such variables gets none
    under_launcher = "TORCHELASTIC_RUN_ID" in os.environ and "MASTER_ADDR" in os.environ
    if world_size > 1 or under_launcher or dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                if var not in os.environ:
                    raise UserError(f"WORLD_SIZE={world_size} but {var} is not set: start with torchrun")
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            if not under_launcher:  # variables set by hand (or left over): say what we wait for, and not forever
                kwargs["store"] = _rendezvous(rank, world_size)
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
        else:
            backend = dist.get_backend()
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)
