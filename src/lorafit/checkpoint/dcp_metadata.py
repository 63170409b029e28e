"""A DCP checkpoint's `.metadata`, read without running pickled code.

torch.distributed.checkpoint's `FileSystemReader.read_metadata` calls plain `pickle.load`, so a checkpoint folder
someone else made (a shared run, a download) could run any code the moment it is resumed. lorafit reads the file
with an unpickler that resolves only DCP's own metadata classes and the few torch/pathlib values they hold (the
`pickle` docs' "Restricting Globals"), both when a checkpoint is verified (before DCP touches the folder) and as
the reader DCP loads with, so the file checked is the file loaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA = ".metadata"

# Every global a DCP metadata pickle of torch 2.6-2.13 names (seen by recording find_class on DCP's own files,
# one process and FSDP2): the metadata dataclasses, torch.Size, dtypes, the layout helper, and paths.
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a checkpoint's metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it uses a persistent id, which a checkpoint's metadata never does")


def read_metadata(file: Path) -> Metadata:
    """The `Metadata` in `file`; pickle.UnpicklingError (naming what was refused) for anything else."""
    with open(file, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError:
            raise
        except Exception as error:  # a truncated or garbled file: EOFError, ValueError, AttributeError ...
            raise pickle.UnpicklingError(f"it is damaged ({type(error).__name__})") from None
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def metadata_problem(folder: Path) -> str | None:
    """None if `folder/.metadata` is safe to hand to DCP; otherwise why not (names the file)."""
    file = Path(folder) / METADATA
    try:
        read_metadata(file)
    except FileNotFoundError:
        return f"{file} is missing"
    except pickle.UnpicklingError as error:
        return f"refused to read {file}: {error}; a pickle that would run code is never loaded"
    return None


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by the restricted unpickler above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
