"""What every GGUF writer does with its --output: the checks before any work, and the atomic write."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafit.atomic import atomic_file
from lorafit.errors import UserError, writing


def check_output(output: Path, *, overwrite: bool, dtype: str, valid: tuple[str, ...], example: str) -> None:
    """A type the writer writes, a file (not a folder) `example` names as a hint, never replaced unasked."""
    if dtype not in valid:
        raise UserError(f"--dtype: {dtype!r} is not a GGUF type lorafit writes here (valid: {', '.join(valid)})")
    if output.is_dir():
        raise UserError(f"--output: {output} is a folder; give a file name such as {output / example}")
    if output.exists() and not overwrite:
        raise UserError(f"--output: {output} exists; choose a new file or pass --overwrite to replace it")


@contextlib.contextmanager
def gguf_file(output: Path, arch: str) -> Iterator[Any]:
    """A `gguf.GGUFWriter` to fill; the file is written when the block ends, atomically (a failure leaves no file,
    and a full disk or a size limit is one error naming --output)."""
    import gguf  # deferred: gguf (and numpy's dtypes) only for an export

    output.parent.mkdir(parents=True, exist_ok=True)
    with writing(output, "--output"), atomic_file(output) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            yield writer
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
