"""Log filters for harmless messages of libraries lorafit imports (kept free of torch: the CLI imports it first)."""

from __future__ import annotations

import logging


class _DropTorchaoLoadNoise(logging.Filter):
    """torchao logs a warning for each CUDA-only extension it cannot load on a CPU build, and torch a deprecation
    note for two of torchao's enums: harmless here, and alarming in a user's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cuda_library = message.startswith("Failed to load") and ".so" in message
        enum_note = "is an Enum subclass and is now natively supported by torch.compile" in message
        return not (cuda_library or enum_note)


def silence_torchao_import_noise() -> None:
    """Install the filter on the two loggers (transformers may import torchao as soon as it is installed)."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTorchaoLoadNoise) for f in logger.filters):
            logger.addFilter(_DropTorchaoLoadNoise())
