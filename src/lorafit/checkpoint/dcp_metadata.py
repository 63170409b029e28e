"""A DCP checkpoint read without running pickled code: its `.metadata` and the non-tensor values in its data files.

torch.distributed.checkpoint unpickles two things with no restriction: `.metadata` (`FileSystemReader.read_metadata`,
plain `pickle.load`) and every non-tensor value of the state dict stored in the `.distcp` files (the optimizer's
lr, betas, ...: `DefaultLoadPlanner.load_bytes`, `torch.load(weights_only=False)`). A checkpoint folder someone else
made (a shared run, a download) could so run any code the moment it is resumed. lorafit reads `.metadata` with an
unpickler that resolves only DCP's own metadata classes and the few torch/pathlib values they hold (the `pickle`
docs' "Restricting Globals"), and the byte values with `torch.load(weights_only=True)`: once when a checkpoint is
verified, before DCP touches the folder, and again in the reader and the planner DCP loads with.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

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


def load_value(data: io.BytesIO | bytes, where: str) -> Any:
    """A non-tensor value DCP stored (torch.save'd): plain values and tensors only."""
    try:
        return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise pickle.UnpicklingError(f"{where} is not a plain value ({reason[:200]})") from None
    except Exception as error:  # truncated or garbled bytes
        raise pickle.UnpicklingError(f"{where} is damaged ({type(error).__name__})") from None


def metadata_problem(folder: Path) -> str | None:
    """None if `folder`'s `.metadata`, and every non-tensor value its data files hold, are safe to hand to DCP;
    otherwise why not (names the file)."""
    file = Path(folder) / METADATA
    try:
        metadata = read_metadata(file)
    except FileNotFoundError:
        return f"{file} is missing"
    except pickle.UnpicklingError as error:
        return f"refused to read {file}: {error}; a pickle that would run code is never loaded"
    for index, item in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue  # tensors are raw bytes, never unpickled
        data_file = Path(folder) / item.relative_path
        try:
            with open(data_file, "rb") as f:
                f.seek(item.offset)
                load_value(f.read(item.length), f"the value {index.fqn} in {data_file.name}")
        except OSError as error:
            return f"cannot read {data_file}: {error.strerror or error}"
        except pickle.UnpicklingError as error:
            return f"refused to load {data_file}: {error}; a pickle that would run code is never loaded"
    return None


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by the restricted unpickler above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with the non-tensor values read as plain values (`weights_only=True`)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = load_value(value, f"the value {fqn}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded
