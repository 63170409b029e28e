"""Modalities' `.pbin` token files and `.idx` raw indexes, read and written without running pickled code.

The `.pbin` layout (Modalities `EmbeddedStreamData`, the same on the `lora` branch and in modalities 0.5.0):

    bytes 0..7     data section length in bytes, little-endian unsigned
    bytes 8..11    bytes per token (1, 2 or 4), little-endian unsigned
    bytes 12..     the tokens, little-endian unsigned, documents back to back
    then           pickle.dumps([(byte_offset, byte_length), ...]): one pair per document, offsets into the
                   data section

A `.idx` file (`create_raw_index`) is `pickle.dumps([(char_offset, length), ...])`, one pair per JSONL line.

Both indexes are pickles, and unpickling runs whatever the file asks for. lorafit reads them with an unpickler
that refuses every global (no class, no function can be named, so nothing can be called), then checks that
what came out is a list of integer pairs. Anything else is a UserError naming the file; nothing runs.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafit.atomic import atomic_file
from lorafit.errors import UserError

DATA_LENGTH_BYTES = 8
TOKEN_SIZE_BYTES = 4
HEADER_BYTES = DATA_LENGTH_BYTES + TOKEN_SIZE_BYTES
TOKEN_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Builds only what pickle opcodes build by themselves (lists, tuples, ints, ...): naming any global, the
    only way a pickle can reach a callable, is refused, as the `pickle` docs' "Restricting Globals" shows."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"the index names the global {module}.{name}; an index holds only integers")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("the index uses a persistent id; an index holds only integers")


def load_pair_index(data: bytes, source: str) -> np.ndarray:
    """The pickled list of (offset, length) integer pairs in `data`, as an (N, 2) int64 array.

    `source` names the file in errors. Raises UserError for anything but a list (or tuple) of integer pairs.
    """
    try:
        value = _NoGlobalsUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError) as e:
        raise UserError(
            f"{source}: refused to read its index: {e} (not a Modalities index of integer pairs; nothing in it was run)"
        ) from None
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{source}: its index is a {type(value).__name__}, expected a list of (offset, length) pairs")
    out = np.empty((len(value), 2), dtype=np.int64)
    for i, pair in enumerate(value):  # bool is an int subclass but never an offset
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(type(v) is int and 0 <= v < 2**63 for v in pair)
        ):
            raise UserError(f"{source}: index entry {i} is {_short(pair)}, expected a pair of non-negative integers")
        out[i] = pair
    return out


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def token_size_for(vocab_size: int) -> int:
    """Bytes per token for a vocabulary (modalities 0.5.0's rule: ceil(log2(V) / 8), rounded up to 1, 2 or 4)."""
    num_bytes = max(1, math.ceil(math.log2(max(vocab_size, 2)) / 8))
    if num_bytes > 4:
        raise UserError(f"a vocabulary of {vocab_size} tokens needs more than 4 bytes per token; .pbin allows 1, 2, 4")
    return num_bytes if num_bytes <= 2 else 4


@dataclass
class PbinFile:
    """A `.pbin` file, opened: `tokens` is a read-only memmap of the data section, `index` the document pairs
    in bytes (N, 2). `document(i)` gives document i's tokens."""

    path: Path
    token_size: int
    data_length: int
    index: np.ndarray
    tokens: np.ndarray

    @property
    def num_tokens(self) -> int:
        return self.data_length // self.token_size

    @property
    def num_documents(self) -> int:
        return len(self.index)

    def document(self, i: int) -> np.ndarray:
        offset, length = (int(v) for v in self.index[i])
        return self.tokens[offset // self.token_size : (offset + length) // self.token_size]


def looks_like_pbin(path: str | Path) -> bool:
    """Whether `path` starts with a .pbin header that fits its size (data length, then 1, 2 or 4 bytes per token):
    enough to tell an earlier `pack_encoded_data` output from a user's file before replacing it."""
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        return False
    data_length = int.from_bytes(header[:DATA_LENGTH_BYTES], "little")
    token_size = int.from_bytes(header[DATA_LENGTH_BYTES:], "little")
    return token_size in TOKEN_DTYPES and HEADER_BYTES + data_length < Path(path).stat().st_size


def read_pbin(path: str | Path, *, field: str | None = None) -> PbinFile:
    """Open a `.pbin` written by Modalities or lorafit. Every inconsistency is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        hint = " (a directory)" if path.is_dir() else ""
        raise UserError(
            f".pbin file not found: {path}{hint}; make one with `lorafit data pack_encoded_data "
            "CONFIG` or `modalities data pack_encoded_data CONFIG`",
            field=field,
        )
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES:
            raise UserError(f"{path}: {size} bytes, shorter than the 12-byte .pbin header", field=field)
        data_length = int.from_bytes(header[:DATA_LENGTH_BYTES], "little")
        token_size = int.from_bytes(header[DATA_LENGTH_BYTES:], "little")
        if token_size not in TOKEN_DTYPES:
            raise UserError(
                f"{path}: the header says {token_size} bytes per token; a .pbin has 1, 2 or 4 (is this a .pbin file?)",
                field=field,
            )
        if HEADER_BYTES + data_length > size:
            raise UserError(
                f"{path}: the header says {data_length} bytes of tokens, but the file has only "
                f"{size - HEADER_BYTES} after the header (truncated?)",
                field=field,
            )
        if data_length % token_size:
            raise UserError(
                f"{path}: {data_length} data bytes are not a whole number of {token_size}-byte tokens", field=field
            )
        f.seek(HEADER_BYTES + data_length)
        index_bytes = f.read()
    try:
        index = load_pair_index(index_bytes, str(path))
    except UserError as e:
        raise e.prefixed(field) if field else e from None
    ends = index[:, 0] + index[:, 1] if len(index) else np.zeros(0, dtype=np.int64)
    bad = np.flatnonzero((ends > data_length) | (index[:, 0] % token_size != 0) | (index[:, 1] % token_size != 0))
    if len(bad):
        i = int(bad[0])
        raise UserError(
            f"{path}: index entry {i} {tuple(int(v) for v in index[i])} does not lie on whole tokens "
            f"inside the {data_length}-byte data section",
            field=field,
        )
    if data_length:
        tokens = np.memmap(
            path, dtype=TOKEN_DTYPES[token_size], mode="r", offset=HEADER_BYTES, shape=(data_length // token_size,)
        )
    else:
        tokens = np.zeros(0, dtype=TOKEN_DTYPES[token_size])
    return PbinFile(path, token_size, data_length, index, tokens)


def write_pbin(path: str | Path, documents: Iterable[Sequence[int] | np.ndarray], token_size: int) -> int:
    """Write documents (token id sequences) as a `.pbin` Modalities reads; returns the number of documents.

    Written to a temporary name and renamed, so an interrupted write never leaves a file that looks complete.
    """
    if token_size not in TOKEN_DTYPES:
        raise ValueError(f"token_size must be 1, 2 or 4, not {token_size}")
    path = Path(path)
    dtype = TOKEN_DTYPES[token_size]
    limit = 2 ** (8 * token_size)
    index: list[tuple[int, int]] = []
    offset = 0
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        f.write((0).to_bytes(DATA_LENGTH_BYTES, "little"))  # the length is known only at the end
        f.write(token_size.to_bytes(TOKEN_SIZE_BYTES, "little"))
        for doc in documents:
            array = np.asarray(doc, dtype=np.int64)
            if len(array) and (array.min() < 0 or array.max() >= limit):
                raise UserError(f"token id {int(array.max())} does not fit {token_size} bytes per token")
            data = array.astype(dtype).tobytes()
            f.write(data)
            index.append((offset, len(data)))
            offset += len(data)
        f.write(pickle.dumps(index))
        f.seek(0)
        f.write(offset.to_bytes(DATA_LENGTH_BYTES, "little"))
    return len(index)


def read_raw_index(path: str | Path) -> np.ndarray:
    """A `.idx` file from `create_raw_index`: (N, 2) (start, length) of each JSONL line, read safely."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"index file not found: {path} (make it with `lorafit data create_raw_index SRC`)")
    return load_pair_index(path.read_bytes(), str(path))
