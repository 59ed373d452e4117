"""Prediction cache keys: one per input row, from the model name and version, each
input's name, datatype and per-row shape, and the row's canonical bytes, so a new model
version never meets an old answer."""

from __future__ import annotations

import hashlib
import json
import struct

import blake3
import numpy as np

from deployments.storage.hashing import HashName


def row_keys(model: str, version: str, inputs: dict[str, np.ndarray], *,
             hash_name: HashName = "blake3", prefix: str = "") -> list[str]:
    """One key per row of the first axis, over everything that decides the answer.

    The head (model, version, and per input in name order: its name, little-endian
    dtype and per-row shape, each length-prefixed) fixes every row's byte length, so
    head + the row's bytes of every input can never be produced by another request.
    The rows' bytes are laid out as one matrix; the only per-row work is the hash.
    """
    if not inputs:
        raise ValueError("no inputs")
    names = sorted(inputs)
    rows = {inputs[n].shape[0] if inputs[n].ndim else 1 for n in names}
    if len(rows) != 1:
        raise ValueError(f"inputs disagree on the number of rows: {sorted(rows)}")
    n_rows = rows.pop()
    head = _frame(model.encode()) + _frame(version.encode())
    parts = []
    for name in names:
        array = inputs[name]
        if array.ndim == 0:
            array = array.reshape(1)
        if array.dtype.kind == "O":
            raise ValueError(f"input {name!r}: object arrays are not cacheable")
        little = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
        head += _frame(name.encode()) + _frame(little.dtype.str.encode()) + _frame(
            json.dumps(list(little.shape[1:])).encode())
        parts.append(little.reshape(n_rows, -1).view(np.uint8))
    matrix = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    if hash_name == "blake3":
        return [prefix + blake3.blake3(head + row).hexdigest() for row in row_bytes(matrix)]
    return [prefix + hashlib.sha256(head + row).hexdigest() for row in row_bytes(matrix)]


def row_bytes(matrix: np.ndarray) -> list[bytes]:
    """Each row of a C-contiguous 2-D uint8 matrix as bytes (one slice of one buffer)."""
    data = np.ascontiguousarray(matrix).tobytes()
    width = matrix.shape[1] if matrix.ndim == 2 else 0
    return [data[i * width:(i + 1) * width] for i in range(matrix.shape[0])]


def _frame(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data
