"""Log filters for harmless messages of libraries lorafit imports (kept free of torch: the CLI imports it first).

Importing lorafit changes no other library's logger: the `lorafit` program installs the filter for its own process
(cli.main), and the library installs it only around the import that causes the noise (`quiet_torchao_import`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

_LOGGERS = ("torchao", "torch.utils._pytree")


class _DropTorchaoLoadNoise(logging.Filter):
    """torchao logs a warning for each CUDA-only extension it cannot load on a CPU build, and torch a deprecation
    note for two of torchao's enums: harmless here, and alarming in a user's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cuda_library = message.startswith("Failed to load") and ".so" in message
        enum_note = "is an Enum subclass and is now natively supported by torch.compile" in message
        return not (cuda_library or enum_note)


def silence_torchao_import_noise() -> list[logging.Logger]:
    """Install the filter on the two loggers for the rest of the process (the `lorafit` program does, since
    transformers may import torchao as soon as it is installed); the loggers it was added to."""
    added = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTorchaoLoadNoise) for f in logger.filters):
            logger.addFilter(_DropTorchaoLoadNoise())
            added.append(logger)
    return added


@contextmanager
def quiet_torchao_import() -> Iterator[None]:
    """The filter only while the block runs (the library's own import of torchao); the loggers as they were after."""
    added = silence_torchao_import_noise()
    try:
        yield
    finally:
        for logger in added:
            for f in [f for f in logger.filters if isinstance(f, _DropTorchaoLoadNoise)]:
                logger.removeFilter(f)
