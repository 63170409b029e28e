"""Random initialisation that waits to see whether a checkpoint replaces it.

A model built from its config alone needs random weights, unless a `model/checkpointed` loads a file into it right
after: then the random values (1-2 s of RNG for 135M parameters on a laptop CPU, more for larger models) are thrown
away. Builders cannot see what will consume their model, so the decision waits for the end of the build:

    with deferred_init():            # around building a config's objects (job.build_run)
        model = graph.build("model") # from_config: allocated, not initialised; checkpointed: loads into it

On leaving the block, every model still uninitialised gets its random init. Outside such a block models are
initialised at once, so nothing ever hands out uninitialised weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn

_ATTR = "_lorafit_uninitialized"
_SCOPE: ContextVar[list[nn.Module] | None] = ContextVar("lorafit_deferred_init", default=None)


@contextlib.contextmanager
def deferred_init() -> Iterator[None]:
    """Models built inside are initialised on leaving, unless weights were loaded into them (nestable)."""
    if _SCOPE.get() is not None:  # the outermost block decides
        yield
        return
    models: list[nn.Module] = []
    token = _SCOPE.set(models)
    try:
        yield
    finally:
        _SCOPE.reset(token)
    # not reached when the build failed: no point initialising what will be thrown away
    for model in models:
        if is_pending(model):
            initialize(model)


def defer_or_initialize(model: nn.Module) -> nn.Module:
    """Called by builders with a model whose parameters are allocated but hold garbage."""
    setattr(model, _ATTR, True)
    scope = _SCOPE.get()
    if scope is None:
        return initialize(model)
    scope.append(model)
    return model


def is_pending(model: nn.Module) -> bool:
    return bool(getattr(model, _ATTR, False))


def clear_pending(model: nn.Module) -> None:
    if hasattr(model, _ATTR):
        delattr(model, _ATTR)


@torch.no_grad()
def initialize(model: nn.Module) -> nn.Module:
    """The model's own random init (Hugging Face: `init_weights`, which also ties embeddings)."""
    if hasattr(model, "init_weights"):
        model.init_weights()
    else:
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    clear_pending(model)
    return model
