"""What a builder may need to know about the build it is part of.

`lorafit validate` builds models on the meta device and loads no weights (meta_device, not load_weights).
`lorafit run` under fsdp2 on several processes builds them on the meta device too, with load_weights: a
model builder then records its weights file instead of reading it (lorafit/models/shard_loading.py), and each
rank reads only its shards after sharding (lorafit/run/build.py). Builders read the current context instead of
taking these as config keys, so the same YAML serves all three.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class BuildContext:
    meta_device: bool = False  # build models without weights (validate, or before sharding)
    load_weights: bool = True  # with meta_device: True records the weights file (read after sharding), False none
    announce: bool = True  # builders say what they built (validate prints its own account, once, in order)
    # the run's seed, which LoRA adapters are drawn from when created (None: the global RNG); the run build sets it
    adapter_seed: int | None = None


_CURRENT: ContextVar[BuildContext] = ContextVar("lorafit_build_context", default=BuildContext())  # noqa: B039 - frozen


def current_context() -> BuildContext:
    return _CURRENT.get()


@contextlib.contextmanager
def build_context(**changes) -> Iterator[BuildContext]:
    token = _CURRENT.set(replace(_CURRENT.get(), **changes))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
