"""The prediction cache's row format: one row of every output, as bytes and back."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from deployments.cache.keys import row_bytes

_MAGIC = b"KPC1"


def encode_row(outputs: dict[str, np.ndarray]) -> bytes:
    """One row's outputs as bytes: a small JSON header and the raw little-endian data.

    Never pickle: a cache that anyone can write to must not be able to run code here.
    """
    return encode_rows({name: np.asarray(value)[None] for name, value in outputs.items()})[0]


def encode_rows(outputs: dict[str, np.ndarray]) -> list[bytes]:
    """Every row (first axis) of ``outputs`` encoded as ``encode_row`` would: the header is
    built once, the rows' data laid out as one matrix."""
    header = []
    parts = []
    n_rows = None
    for name, value in outputs.items():
        if value.dtype.kind == "O":
            raise ValueError(f"output {name!r}: object arrays are not cacheable")
        n_rows = value.shape[0] if n_rows is None else n_rows
        if value.shape[0] != n_rows:
            raise ValueError("outputs disagree on the number of rows")
        little = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("<"), copy=False))
        header.append({"n": name, "d": little.dtype.str, "s": list(little.shape[1:]),
                       "b": little[0:1].nbytes if n_rows else 0})
        parts.append(little.reshape(n_rows, -1).view(np.uint8))
    if n_rows is None:
        raise ValueError("no outputs")
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = _MAGIC + struct.pack("<I", len(head)) + head
    matrix = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return [prefix + row for row in row_bytes(matrix)]


_Layout = list[tuple[str, np.dtype[Any], tuple[int, ...], int]]
#: Parsed headers by their bytes: every row of one model version shares one.
_LAYOUTS: dict[bytes, _Layout] = {}


def _layout(head: bytes) -> _Layout:
    layout = _LAYOUTS.get(head)
    if layout is not None:
        return layout
    try:
        header = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"damaged cache entry header: {exc}") from exc
    if not isinstance(header, list):
        raise ValueError("damaged cache entry header")
    layout = []
    try:
        for entry in header:
            dtype = np.dtype(entry["d"])
            if dtype.kind == "O":
                raise ValueError("object dtype in a cache entry")
            shape = tuple(int(d) for d in entry["s"])
            size = int(entry["b"])
            if size != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise ValueError("cache entry sizes disagree")
            layout.append((str(entry["n"]), dtype, shape, size))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"damaged cache entry: {exc}") from exc
    if len(_LAYOUTS) >= 1024:
        _LAYOUTS.clear()
    _LAYOUTS[head] = layout
    return layout


def decode_row(data: bytes) -> dict[str, np.ndarray]:
    """The inverse of ``encode_row``; any damage raises ``ValueError``."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
        raise ValueError("not a Keel cache entry")
    (head_len,) = struct.unpack_from("<I", data, len(_MAGIC))
    start = len(_MAGIC) + 4
    layout = _layout(bytes(data[start:start + head_len]))
    pos = start + head_len
    outputs: dict[str, np.ndarray] = {}
    for name, dtype, shape, size in layout:
        blob = data[pos:pos + size]
        if len(blob) != size:
            raise ValueError("truncated cache entry")
        pos += size
        outputs[name] = np.frombuffer(blob, dtype=dtype).reshape(shape).astype(
            dtype.newbyteorder("="))
    if pos != len(data):
        raise ValueError("trailing bytes in a cache entry")
    return outputs
