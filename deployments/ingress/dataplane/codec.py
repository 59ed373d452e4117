"""Open Inference Protocol codecs: request JSON (+ binary tensor data) <-> numpy.

Every check here names the tensor it is about, so a 400 tells the client what
to fix. Nothing in this module knows about Ray or HTTP frameworks.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from deployments.contracts import InferenceRequest, RequestInput
from deployments.errors import InvalidInput, field_errors
from deployments.repository import NUMPY_DTYPES, ModelSpec, TensorSpec

#: Header of the binary tensor data extension (Triton's, which tritonclient speaks).
BINARY_HEADER = "inference-header-content-length"
#: Most dimensions a tensor may have (numpy's own limit); deeper data is refused.
MAX_RANK = 64
_INT_KINDS = "iu"
_NUMERIC_KINDS = "biuf"


def parse_request(body: bytes, json_length: int | None = None) -> tuple[InferenceRequest,
                                                                         bytes]:
    """Split and validate a request body; returns the request and its binary tail."""
    if json_length is not None:
        if json_length < 0 or json_length > len(body):
            raise InvalidInput(f"{BINARY_HEADER} ({json_length}) is outside the body "
                               f"({len(body)} bytes)")
        head, tail = body[:json_length], body[json_length:]
    else:
        head, tail = body, b""
    # orjson first (the fast path). It refuses the NaN/Infinity literals Python's json and
    # Triton accept, and reads integers past 64 bits as floats: those bodies, and any body
    # that does not validate, are read again with Python's json, so every answer (and every
    # error, naming the tensor) is the same as before orjson.
    try:
        return _validated(orjson.loads(head)), tail
    except (ValueError, UnicodeDecodeError, RecursionError, InvalidInput):
        pass
    try:
        payload = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
    return _validated(payload), tail


def _validated(payload: Any) -> InferenceRequest:
    if not isinstance(payload, dict):
        raise InvalidInput("request body must be a JSON object")
    try:
        return InferenceRequest.model_validate(payload)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc)) from exc


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field: ``inputs.0.shape: ...``."""
    return "; ".join(field_errors(exc, limit=5))


def decode_inputs(request: InferenceRequest, spec: ModelSpec,
                  binary: bytes = b"") -> dict[str, np.ndarray]:
    """Turn the request's inputs into arrays that exactly match the model's declared inputs."""
    declared = {t.name for t in spec.inputs}
    seen: set[str] = set()
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for item in request.inputs:
        tensor = spec.input(item.name)
        if tensor is None:
            raise InvalidInput(f"input {item.name!r} is not an input of model {spec.name!r} "
                               f"(it takes {sorted(declared)})")
        if item.name in seen:
            raise InvalidInput(f"input {item.name!r} is given twice")
        seen.add(item.name)
        size = _binary_size(item)
        if size is not None:
            if offset + size > len(binary):
                raise InvalidInput(f"input {item.name!r}: binary_data_size {size} runs past the "
                                   f"end of the body")
            chunk, offset = binary[offset:offset + size], offset + size
            arrays[item.name] = _decode_binary(item, tensor, chunk)
        else:
            arrays[item.name] = _decode_json(item, tensor)
    missing = declared - seen
    if missing:
        raise InvalidInput(f"input {sorted(missing)[0]!r} is missing (model {spec.name!r} "
                           f"takes {sorted(declared)})")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by "
                           f"any input's binary_data_size")
    return arrays


def _binary_size(item: RequestInput) -> int | None:
    params = item.parameters or {}
    size = params.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"input {item.name!r}: binary_data_size must be a non-negative "
                           f"integer")
    if item.data is not None:
        raise InvalidInput(f"input {item.name!r}: has both data and binary_data_size")
    return size


def _check_header(item: RequestInput, tensor: TensorSpec) -> tuple[int, ...]:
    if item.datatype != tensor.datatype:
        raise InvalidInput(f"input {item.name!r}: datatype {item.datatype} does not match the "
                           f"model's {tensor.datatype}")
    shape = tuple(item.shape)
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {item.name!r}: shape has {len(shape)} dimensions; the "
                           f"model's {tensor.shape} has {len(tensor.shape)}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {item.name!r}: shape {list(shape)} has a negative dimension")
    if len(shape) != len(tensor.shape) or any(
        want != -1 and want != got for want, got in zip(tensor.shape, shape, strict=True)
    ):
        raise InvalidInput(f"input {item.name!r}: shape {list(shape)} does not match the "
                           f"model's {tensor.shape} (-1 is any size)")
    if tensor.batched and shape[0] == 0:
        raise InvalidInput(f"input {item.name!r}: the batch dimension is 0")
    return shape


def _decode_json(item: RequestInput, tensor: TensorSpec) -> np.ndarray:
    shape = _check_header(item, tensor)
    if item.data is None:
        raise InvalidInput(f"input {item.name!r}: no data (and no binary_data_size)")
    expected = math.prod(shape)
    if tensor.datatype == "BYTES":
        flat = _flatten_bytes(item)
        if len(flat) != expected:
            raise InvalidInput(f"input {item.name!r}: data has {len(flat)} elements but shape "
                               f"{list(shape)} needs {expected}")
        return np.array(flat, dtype=object).reshape(shape)
    try:
        raw = np.asarray(item.data)
    except ValueError as exc:
        raise InvalidInput(f"input {item.name!r}: data is ragged or not numeric") from exc
    if raw.dtype.kind == "O" or raw.dtype.kind not in _NUMERIC_KINDS:
        raise InvalidInput(f"input {item.name!r}: data must hold only "
                           f"{'booleans' if tensor.datatype == 'BOOL' else 'numbers'}")
    if raw.size != expected:
        raise InvalidInput(f"input {item.name!r}: data has {raw.size} elements but shape "
                           f"{list(shape)} needs {expected}")
    target = tensor.numpy_dtype
    if (target.kind == "b") != (raw.dtype.kind == "b"):
        raise InvalidInput(f"input {item.name!r}: {tensor.datatype} data must be "
                           f"{'true/false' if target.kind == 'b' else 'numbers, not booleans'}")
    if target.kind in _INT_KINDS:
        if raw.dtype.kind == "f":
            raise InvalidInput(f"input {item.name!r}: {tensor.datatype} data must be integers")
        info = np.iinfo(target)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise InvalidInput(f"input {item.name!r}: a value is outside the range of "
                               f"{tensor.datatype} [{info.min}, {info.max}]")
    with np.errstate(over="ignore", invalid="ignore"):
        array = raw.astype(target, copy=False).reshape(shape)
    if target.kind == "f" and raw.dtype.kind == "f":
        # A finite value that does not fit the datatype is an error even where NaN is allowed.
        overflow = np.isfinite(raw.reshape(shape)) & ~np.isfinite(array)
        if overflow.any():
            where = np.argwhere(overflow)[0].tolist()
            raise InvalidInput(f"input {item.name!r}: element {where} is outside the range of "
                               f"{tensor.datatype}")
    _check_finite(item.name, tensor, array)
    return array


def _flatten_bytes(item: RequestInput) -> list[bytes]:
    # Iterative, not recursive: JSON nested nearly to the decoder's depth limit would
    # otherwise overflow the stack here (RecursionError, a 500) instead of being a 400.
    out: list[bytes] = []
    stack: list[Any] = [iter([item.data])]
    while stack:
        value = next(stack[-1], _END)
        if value is _END:
            stack.pop()
        elif isinstance(value, list):
            if len(stack) > MAX_RANK:
                raise InvalidInput(f"input {item.name!r}: data is nested more than "
                                   f"{MAX_RANK} deep")
            stack.append(iter(value))
        elif isinstance(value, str):
            out.append(value.encode())
        else:
            raise InvalidInput(f"input {item.name!r}: BYTES data must be strings")
    return out


_END = object()


def _decode_binary(item: RequestInput, tensor: TensorSpec, chunk: bytes) -> np.ndarray:
    shape = _check_header(item, tensor)
    expected = math.prod(shape)
    if tensor.datatype == "BYTES":
        return _decode_binary_bytes(item, chunk, shape)
    dtype = NUMPY_DTYPES[tensor.datatype].newbyteorder("<")
    if len(chunk) != expected * dtype.itemsize:
        raise InvalidInput(f"input {item.name!r}: {len(chunk)} bytes of binary data but shape "
                           f"{list(shape)} of {tensor.datatype} needs {expected * dtype.itemsize}")
    array = np.frombuffer(chunk, dtype=dtype).astype(tensor.numpy_dtype).reshape(shape)
    _check_finite(item.name, tensor, array)
    return array


def _decode_binary_bytes(item: RequestInput, chunk: bytes, shape: tuple[int, ...]) -> np.ndarray:
    # Each element: 4-byte little-endian length, then that many bytes.
    values: list[bytes] = []
    pos = 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise InvalidInput(f"input {item.name!r}: truncated BYTES element length")
        length = int.from_bytes(chunk[pos:pos + 4], "little")
        pos += 4
        if pos + length > len(chunk):
            raise InvalidInput(f"input {item.name!r}: truncated BYTES element")
        values.append(chunk[pos:pos + length])
        pos += length
    if len(values) != math.prod(shape):
        raise InvalidInput(f"input {item.name!r}: {len(values)} BYTES elements but shape "
                           f"{list(shape)} needs {math.prod(shape)}")
    return np.array(values, dtype=object).reshape(shape)


def _check_finite(name: str, tensor: TensorSpec, array: np.ndarray) -> None:
    if array.dtype.kind != "f" or tensor.allow_nan:
        return
    if not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0].tolist()
        what = "NaN" if np.isnan(array[tuple(bad)]) else "infinite"
        raise InvalidInput(f"input {name!r}: element {bad} is {what}; the model does not "
                           f"accept NaN or infinity")


def wants_binary(request: InferenceRequest, output: str) -> bool:
    """Whether the client asked for ``output`` in the binary tensor data extension."""
    for requested in request.outputs or []:
        if requested.name == output:
            params = requested.parameters or {}
            return bool(params.get("binary_data", False))
    params = request.parameters or {}
    return bool(params.get("binary_data_output", False))


def requested_outputs(request: InferenceRequest, spec: ModelSpec) -> list[str] | None:
    """Names of the outputs the client asked for (``None``: all), each checked."""
    if not request.outputs:
        return None
    names = []
    for requested in request.outputs:
        if spec.output(requested.name) is None:
            raise InvalidInput(f"output {requested.name!r} is not an output of model "
                               f"{spec.name!r} (it has {[t.name for t in spec.outputs]})")
        names.append(requested.name)
    return names


def encode_response(request: InferenceRequest, spec: ModelSpec, version: str,
                    outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """Serialise the outputs; returns the body and, with binary outputs, the JSON length."""
    blobs: list[bytes] = []
    encoded = []
    for name, value in outputs.items():
        tensor = spec.output(name)
        datatype = tensor.datatype if tensor is not None else "FP32"
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
        if wants_binary(request, name):
            blob = to_binary(value, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(value, datatype)
        encoded.append(entry)
    response: dict[str, Any] = {"model_name": spec.name, "model_version": version,
                                "outputs": encoded}
    if request.id is not None:
        response["id"] = request.id
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def _json_data(value: np.ndarray, datatype: str) -> np.ndarray | list[Any]:
    """The flat data as orjson writes it without a Python list (numeric tensors; NaN and
    inf become null), or as a list where it cannot (BYTES, float16)."""
    if datatype != "BYTES" and value.dtype.kind in "biuf" and value.dtype.itemsize > 2:
        return np.ascontiguousarray(value.reshape(-1))
    return _to_json_list(value, datatype)


def _to_json_list(value: np.ndarray, datatype: str) -> list[Any]:
    flat = value.reshape(-1)
    if datatype == "BYTES":
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in flat]
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        # JSON has no NaN/inf: send null rather than invalid JSON.
        return [None if not math.isfinite(v) else v for v in flat.tolist()]
    return list(flat.tolist())


def to_binary(value: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for v in value.reshape(-1):
            data = v if isinstance(v, bytes) else str(v).encode()
            parts.append(len(data).to_bytes(4, "little") + data)
        return b"".join(parts)
    dtype = NUMPY_DTYPES[datatype].newbyteorder("<")
    return np.ascontiguousarray(value, dtype=dtype).tobytes()


def model_metadata(spec: ModelSpec, versions: list[str]) -> dict[str, Any]:
    """The metadata document of the Open Inference Protocol for one model."""
    return {
        "name": spec.name,
        "versions": versions,
        "platform": spec.platform,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape}
                   for t in spec.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape}
                    for t in spec.outputs],
    }

