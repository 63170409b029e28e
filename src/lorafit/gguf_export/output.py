"""The checks every GGUF writer makes on its --output and --dtype before any work."""

from __future__ import annotations

from pathlib import Path

from lorafit.errors import UserError


def check_output(output: Path, *, overwrite: bool, dtype: str, valid: tuple[str, ...], example: str) -> None:
    """A type the writer writes, a file (not a folder) `example` names as a hint, never replaced unasked."""
    if dtype not in valid:
        raise UserError(f"--dtype: {dtype!r} is not a GGUF type lorafit writes here (valid: {', '.join(valid)})")
    if output.is_dir():
        raise UserError(f"--output: {output} is a folder; give a file name such as {output / example}")
    if output.exists() and not overwrite:
        raise UserError(f"--output: {output} exists; choose a new file or pass --overwrite to replace it")
