"""Closed-loop gRPC load generator for the Open Inference Protocol (KServe V2) gRPC service.

The gRPC twin of ``http_load.run_load``: ``concurrency`` workers each send one
``inference.GRPCInferenceService/ModelInfer`` call, wait for the answer, and send the
next, for ``warmup_s + duration_s``; only calls that *complete* inside the measured
window count, and the result is the same ``http_load.LoadResult`` (req/s, p50/p95/p99,
statuses, the first few error messages). A call that ends with a status other than OK
is an error (its status name, e.g. ``UNAVAILABLE``, is its ``statuses`` key).

The requests are built ahead of time (``requests_from_bodies``) from the same OIP JSON
bodies the HTTP points send (``http_load.make_row_bodies``): every input becomes a
``ModelInferRequest`` input with no ``contents`` and its values, little-endian, in
``raw_input_contents`` (FP32 ``features`` ``[rows, 12]``: 48 bytes a row). The client is
Keel's own stub and messages (``deployments.ingress.grpc.protocol``, a private
protobuf pool, so this runs beside tritonclient or kserve imports) over ``grpc.aio``
channels: ``channels`` HTTP/2 connections (each its own, not grpc's shared subchannel),
worker i on channel ``i % channels``. ``python -m bench.grpc_load`` runs it on its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from bench.harness.http_load import (
    BodySequence,
    LoadResult,
    Tally,
    make_row_bodies,
    summarise_window,
)
from deployments.ingress.grpc.protocol import InferenceStub, ModelInferRequest

#: OIP datatype -> little-endian numpy dtype of its raw (binary) contents.
RAW_DTYPES: dict[str, str] = {
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT8": "i1", "INT16": "<i2",
    "INT32": "<i4", "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4",
    "UINT64": "<u8", "BOOL": "?",
}
#: OIP datatype -> the ``InferTensorContents`` field its typed contents go in.
CONTENTS_FIELDS: dict[str, str] = {
    "FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "BOOL": "bool_contents",
}
#: Channel options: a channel of its own (grpc would otherwise share one connection
#: between channels to the same target) and no message size limit below OIP's needs.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def infer_request(model: str, inputs: dict[str, tuple[str, np.ndarray]],
                  request_id: str = "") -> Any:
    """One ``ModelInferRequest`` for ``model``: each input ``name -> (datatype, array)``
    with its shape and datatype, its values as raw little-endian bytes."""
    request = ModelInferRequest(model_name=model, id=request_id)
    for name, (datatype, array) in inputs.items():
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(
            np.ascontiguousarray(array, dtype=RAW_DTYPES[datatype]).tobytes())
    return request


def request_from_body(body: bytes, model: str) -> Any:
    """The ``ModelInferRequest`` with the same inputs as an OIP REST JSON body (the
    values converted to the input's datatype, as a server converts the JSON numbers)."""
    document = json.loads(body)
    inputs = {item["name"]: (item["datatype"],
                             np.asarray(item["data"], dtype=RAW_DTYPES[item["datatype"]])
                             .reshape(item["shape"]))
              for item in document["inputs"]}
    return infer_request(model, inputs, str(document.get("id", "")))


def requests_from_bodies(bodies: Sequence[bytes], model: str) -> list[Any]:
    """``request_from_body`` for every body, in order."""
    return [request_from_body(body, model) for body in bodies]


def outputs_of(response: Any) -> dict[str, np.ndarray]:
    """A ``ModelInferResponse``'s outputs by name as flat float64 arrays, from
    ``raw_output_contents`` when the server sent them raw, else from ``contents``."""
    found: dict[str, np.ndarray] = {}
    raw = list(response.raw_output_contents)
    for index, output in enumerate(response.outputs):
        if raw:
            values = np.frombuffer(raw[index], dtype=RAW_DTYPES[output.datatype])
        else:
            values = np.asarray(getattr(output.contents, CONTENTS_FIELDS[output.datatype]))
        found[output.name] = values.astype(np.float64).ravel()
    return found


def open_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(status, message) of a failed call: the gRPC status name and its details, or the
    exception's class name and text."""
    code = getattr(exc, "code", None)
    if isinstance(exc, grpc.RpcError) and callable(code):
        status = code()
        details = getattr(exc, "details", None)
        return (getattr(status, "name", None) or "UNKNOWN",
                str((details() if callable(details) else None) or exc)[:500])
    return type(exc).__name__, str(exc)[:500]


def infer_once(target: str, request: Any, timeout_s: float = 10.0,
               metadata: Sequence[tuple[str, str]] = ()) -> Any:
    """One blocking ``ModelInfer`` call on a channel of its own (readiness checks);
    raises ``grpc.RpcError`` on a status other than OK."""
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        return InferenceStub(channel).ModelInfer(request, timeout=timeout_s,
                                                 metadata=tuple(metadata) or None)


async def _worker(stub: InferenceStub, requests: BodySequence[Any], worker: int,
                  tally: Tally, timeout_s: float,
                  metadata: tuple[tuple[str, str], ...] | None) -> None:
    end = tally.end
    call = stub.ModelInfer
    while True:
        sent = time.perf_counter()
        if sent >= end:
            return
        request = requests.take(worker)
        status = "OK"
        detail = ""
        try:
            await call(request, timeout=timeout_s, metadata=metadata)
        except (grpc.RpcError, OSError, TimeoutError) as exc:
            status, detail = describe_error(exc)
        done = time.perf_counter()
        if status == "UNAVAILABLE":
            # A refused connection fails at once; without a pause the loop would spin.
            await asyncio.sleep(0.01)
        tally.record(sent, done, status, status == "OK", detail)


async def run_grpc_load(target: str, concurrency: int, duration_s: float,
                        warmup_s: float = 2.0, requests: Sequence[Any] | None = None,
                        request_timeout_s: float = 30.0, *, model: str = "risk_mlp",
                        channels: int = 4, shared_sequence: bool = False,
                        metadata: Sequence[tuple[str, str]] = ()) -> LoadResult:
    """Run ``concurrency`` closed-loop ``ModelInfer`` workers against ``target``
    (``host:port``) over ``min(channels, concurrency)`` channels and summarise the
    window (``requests``: prepared ``ModelInferRequest`` messages; default: 512
    one-row requests for ``model``). ``shared_sequence`` as in ``http_load.run_load``."""
    if concurrency < 1 or duration_s <= 0 or warmup_s < 0 or channels < 1:
        raise ValueError("concurrency >= 1, channels >= 1, duration_s > 0 and warmup_s >= 0 "
                         "are required")
    pool = list(requests) if requests is not None else requests_from_bodies(
        make_row_bodies(512), model)
    opened = [open_channel(target) for _ in range(min(channels, concurrency))]
    try:
        # Connect first, so the warm-up is not spent on the handshakes.
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), min(5.0, request_timeout_s))
                               for c in opened), return_exceptions=True)
        stubs = [InferenceStub(c) for c in opened]
        begin = time.perf_counter()
        tally = Tally(begin + warmup_s, begin + warmup_s + duration_s)
        sequence: BodySequence[Any] = BodySequence(pool, max(1, concurrency), shared_sequence)
        await asyncio.gather(*(
            _worker(stubs[i % len(stubs)], sequence, i, tally, request_timeout_s,
                    tuple(metadata) or None)
            for i in range(concurrency)))
    finally:
        await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)
    return summarise_window(LoadResult(url=f"grpc://{target}", concurrency=concurrency,
                                       duration_s=duration_s, warmup_s=warmup_s),
                            tally, sequence)
