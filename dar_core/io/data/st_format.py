"""The safetensors file layout, read and written without loading whole files.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, ``data_offsets`` into the data section; ``__metadata__``: str -> str), padded
with spaces to a multiple of 8, then the raw little-endian tensor bytes. Knowing the offsets,
the loader reads single rows with ``pread`` (no memory map, so the pages it reads are not
counted in its resident memory), and ``dar prepare`` streams a shard to disk without building
the whole file in memory a second time (``safetensors.numpy.save`` returns one ``bytes``).
Files written here read back with ``safetensors.safe_open`` and vice versa.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dar_core.errors import InputError
from dar_core.io.checkpoint import atomic_file

DTYPES: dict[str, np.dtype] = {
    "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"), "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike[str]) -> Header:
    """The tensors and metadata of a safetensors file; ``InputError`` naming the file if it
    is truncated, not safetensors, or holds a dtype NumPy cannot read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"file is {size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    base = 8 + n
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(v) for v in info["data_offsets"])
        except KeyError as e:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype or a malformed "
                             f"header entry ({e})") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != nbytes or base + end > size:
            raise InputError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) needs "
                             f"bytes {start}..{start + nbytes} but the file holds "
                             f"{size - base} data bytes (truncated?)")
        tensors[name] = TensorInfo(dtype, shape, base + start, nbytes)
    return Header(tensors, {str(k): str(v) for k, v in meta.items()})


def write_safetensors(path: str | os.PathLike[str], tensors: dict[str, np.ndarray],
                      metadata: dict[str, str]) -> None:
    """Write ``tensors`` atomically (temp file in the same folder, fsync, rename), streaming
    each array's bytes instead of serialising the whole file first."""
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, a in arrays.items():
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in _CODES:
            raise InputError(f"tensor {name!r}: dtype {a.dtype} cannot be written")
        header[name] = {"dtype": _CODES[dt], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(memoryview(a.astype(a.dtype.newbyteorder("<"), copy=False)).cast("B"))
