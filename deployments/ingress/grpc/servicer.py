"""The Open Inference Protocol over gRPC, on the data plane: translation only.

``GrpcOip`` answers the six methods of ``inference.GRPCInferenceService``
(grpc_protocol.py) for the ingress deployment, whose methods of the same names Ray
Serve's gRPC ingress calls. A ``ModelInferRequest`` becomes the same parsed request a
REST body becomes (typed ``contents`` as JSON ``data``; ``raw_input_contents`` and
typed BYTES as the binary tensor extension), so validation, the cache, coalescing and
every error message are the data plane's, shared with REST. ``KeelError`` statuses
become gRPC status codes; the API key comes from the ``authorization`` (or
``x-api-key``) metadata; each answered call is reported to the request observer
(metrics, SLO events) like a REST request, under its method path as the route, inside
a ``keel.request`` span (a child of the span Ray Serve opens for the call, itself
continuing a ``traceparent`` in the call's metadata).

No Ray here: the context is anything with ``invocation_metadata``, ``set_code``,
``set_details`` and ``set_trailing_metadata`` (Ray's ``RayServegRPCContext`` or
grpcio's ``ServicerContext``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import grpc
import numpy as np
from google.protobuf.message import Message
from opentelemetry.trace import SpanKind, Status, StatusCode

from deployments.contracts import InferenceRequest, RequestInput, RequestOutput
from deployments.errors import InvalidInput, KeelError, PayloadTooLarge
from deployments.ingress.auth import (
    ApiKey,
    AuthConfig,
    Caller,
    authenticate,
    authorize,
    current_caller,
)
from deployments.ingress.dataplane import codec
from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.dataplane.predictor import Prediction, summarise
from deployments.ingress.grpc import protocol as pb
from deployments.ingress.rollout.split import ROUTE_KEY_HEADER
from deployments.observability import tracing
from deployments.observability.asgi import GuardedObserver, RequestObserver

#: The typed-contents field that carries each datatype (FP16/BF16: raw contents only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_ALL_FIELDS = sorted(set(CONTENTS_FIELD.values()))

#: The gRPC status of each HTTP status a ``KeelError`` carries.
GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
#: Methods that answer without an API key (as REST's probes and ``/v2`` do).
OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})
#: What the client gets when its deadline passed or it went away (the HTTP status the
#: metrics record: nginx's "client closed request").
CLIENT_GONE = 499


def grpc_code(error: KeelError) -> grpc.StatusCode:
    return GRPC_CODES.get(error.status, grpc.StatusCode.INTERNAL)


class GrpcContext(Protocol):
    def invocation_metadata(self) -> Iterable[tuple[str, Any]] | None: ...

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def set_trailing_metadata(self, trailing_metadata: list[tuple[str, str]]) -> None: ...


def metadata_of(context: GrpcContext) -> dict[str, str]:
    """The call's metadata, names lower-cased (binary ``-bin`` values left out)."""
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


# --- requests -------------------------------------------------------------------------


def parameters_of(params: Mapping[str, Any]) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as the plain dict REST bodies carry."""
    if not params:
        return {}
    out: dict[str, Any] = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, choice) if choice is not None else None
    return out


def to_request(message: Any) -> tuple[InferenceRequest, bytes]:
    """A ``ModelInferRequest`` as the data plane's parsed request and its binary tail."""
    raw = list(message.raw_input_contents)
    if not message.inputs:
        raise InvalidInput("inputs: at least one input tensor is required")
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for "
                           f"{len(message.inputs)} inputs (one per input, in their order)")
    inputs: list[RequestInput] = []
    tail: list[bytes] = []
    for index, tensor in enumerate(message.inputs):
        params = parameters_of(tensor.parameters)
        params.pop("binary_data_size", None)  # Keel sets it from the contents it carries
        data: list[Any] | None = None
        if raw:
            if tensor.HasField("contents") and _typed_fields(tensor.contents):
                raise InvalidInput(f"input {tensor.name!r}: has typed contents but the "
                                   f"request carries raw_input_contents (use one or the other)")
            blob = raw[index]
        elif tensor.datatype == "BYTES":
            values = _typed(tensor)
            blob = b"".join(len(v).to_bytes(4, "little") + v for v in values)
        else:
            data, blob = _typed(tensor), None
        if blob is not None:
            params["binary_data_size"] = len(blob)
            tail.append(blob)
        inputs.append(RequestInput.model_construct(
            name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape),
            parameters=params or None, data=data))
    outputs = [RequestOutput.model_construct(name=o.name,
                                             parameters=parameters_of(o.parameters) or None)
               for o in message.outputs]
    request = InferenceRequest.model_construct(
        id=message.id or None, parameters=parameters_of(message.parameters) or None,
        inputs=inputs, outputs=outputs or None)
    return request, b"".join(tail)


def _typed_fields(contents: Any) -> list[str]:
    return [name for name in _ALL_FIELDS if len(getattr(contents, name))]


def _typed(tensor: Any) -> list[Any]:
    """The input's elements from the typed field its datatype uses, checked to be there."""
    field = CONTENTS_FIELD.get(tensor.datatype)
    present = _typed_fields(tensor.contents)
    if field is None:
        if tensor.datatype in ("FP16", "BF16"):
            raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} data travels in "
                               f"raw_input_contents only (no typed field holds it)")
        raise InvalidInput(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    if not present:
        raise InvalidInput(f"input {tensor.name!r}: no data (contents.{field} is empty and "
                           f"there are no raw_input_contents)")
    if present != [field]:
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} data goes in "
                           f"contents.{field} (found {', '.join(present)})")
    return list(getattr(tensor.contents, field))


# --- answers --------------------------------------------------------------------------


def to_response(message: Any, prediction: Prediction) -> Message:
    """The ``ModelInferResponse``: raw output contents when the request sent raw inputs
    (or an output has no typed field), typed contents otherwise."""
    spec = prediction.spec
    datatypes = {}
    for name in prediction.outputs:
        tensor = spec.output(name)
        datatypes[name] = tensor.datatype if tensor is not None else "FP32"
    raw = bool(message.raw_input_contents) or any(
        d not in CONTENTS_FIELD for d in datatypes.values())
    response = pb.ModelInferResponse(model_name=spec.name, model_version=prediction.version,
                                     id=message.id)
    for name, value in prediction.outputs.items():
        datatype = datatypes[name]
        out = response.outputs.add(name=name, datatype=datatype, shape=list(value.shape))
        if raw:
            response.raw_output_contents.append(codec.to_binary(value, datatype))
        else:
            getattr(out.contents, CONTENTS_FIELD[datatype]).extend(_elements(value, datatype))
    response.parameters["cache"].string_param = summarise(prediction.cache)
    return response


def _elements(value: np.ndarray, datatype: str) -> list[Any]:
    flat = value.reshape(-1)
    if datatype == "BYTES":
        return [v if isinstance(v, bytes) else str(v).encode() for v in flat]
    return list(flat.tolist())


def _metadata_response(document: Mapping[str, Any]) -> Message:
    response = pb.ModelMetadataResponse(name=document["name"],
                                        versions=list(document["versions"]),
                                        platform=document["platform"])
    for kind in ("inputs", "outputs"):
        for tensor in document[kind]:
            getattr(response, kind).add(name=tensor["name"], datatype=tensor["datatype"],
                                        shape=list(tensor["shape"]))
    return response


# --- the service ----------------------------------------------------------------------


class GrpcOip:
    """The six methods, each ``await oip.call("ModelInfer", request, context)``."""

    def __init__(self, plane: DataPlane, auth: Callable[[], AuthConfig],
                 observer: RequestObserver | None = None) -> None:
        self.plane = plane
        self._auth = auth
        self._observer = GuardedObserver(observer) if observer is not None else None
        self._methods: dict[str, Callable[[Any, ApiKey | None], Awaitable[Message]]] = {
            "ServerLive": self._server_live, "ServerReady": self._server_ready,
            "ServerMetadata": self._server_metadata, "ModelReady": self._model_ready,
            "ModelMetadata": self._model_metadata,
        }

    async def call(self, method: str, request: Any, context: GrpcContext) -> Message:
        """Answer one call; a ``KeelError`` becomes the call's status (the response is
        then empty), with ``retry-after`` and ``keel-stage`` in the trailing metadata."""
        started = time.perf_counter()
        status = 500
        model = getattr(request, "model_name", "") or getattr(request, "name", "")
        auth = self._auth()
        metadata = metadata_of(context) if auth.enabled else {}  # read only for API keys
        version = ""
        try:
            with tracing.span("keel.request", {"rpc.system": "grpc",
                                               "rpc.service": pb.SERVICE,
                                               "rpc.method": method},
                              kind=SpanKind.SERVER) as span:
                try:
                    key = self._key(auth, method, metadata, model)
                    if method == "ModelInfer":
                        response, version = await self._model_infer(request, route_key(context))
                    else:
                        response = await self._methods[method](request, key)
                    status = 200
                    return response
                except KeelError as exc:
                    status = exc.status
                    _fail(context, exc)
                    if span is not None:
                        span.set_attribute("rpc.grpc.status_code", grpc_code(exc).value[0])
                        if exc.status >= 500:
                            span.set_status(Status(StatusCode.ERROR))
                    return pb.message(pb.METHODS[method][1])()
                except asyncio.CancelledError:
                    status = CLIENT_GONE  # the client's deadline passed, or it went away
                    raise
        finally:
            self._observe(method, model, status, (time.perf_counter() - started) * 1000,
                          version)

    @staticmethod
    def _key(config: AuthConfig, method: str, metadata: Mapping[str, str],
             model: str) -> ApiKey | None:
        if not config.enabled or method in OPEN_METHODS:
            return None
        key = authenticate(config, metadata)
        if model:
            authorize(key, model)
        current_caller.set(Caller(key.name, key.tenant))  # the payload log's key and tenant
        return key

    def _observe(self, method: str, model: str, status: int, latency_ms: float,
                 version: str) -> None:
        if self._observer is not None:
            self._observer.request(pb.method_path(method), model, status, latency_ms, version)

    async def _server_live(self, request: Any, key: ApiKey | None) -> Message:
        return pb.ServerLiveResponse(live=True)

    async def _server_ready(self, request: Any, key: ApiKey | None) -> Message:
        is_ready, _ = await self.plane.ready()
        return pb.ServerReadyResponse(ready=is_ready)

    async def _server_metadata(self, request: Any, key: ApiKey | None) -> Message:
        document = self.plane.server_metadata()
        return pb.ServerMetadataResponse(name=document["name"], version=document["version"],
                                         extensions=document["extensions"])

    async def _model_ready(self, request: Any, key: ApiKey | None) -> Message:
        _require_name(request.name, "name")
        is_ready, _ = await self.plane.model_ready(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=is_ready)

    async def _model_metadata(self, request: Any, key: ApiKey | None) -> Message:
        _require_name(request.name, "name")
        return _metadata_response(
            await self.plane.model_metadata(request.name, request.version or None))

    async def _model_infer(self, request: Any, route: str | None) -> tuple[Message, str]:
        """The answer and the version that gave it."""
        with self.plane.admitted():  # UNAVAILABLE + retry-after when the replica is full
            return await self._infer_admitted(request, route)

    async def _infer_admitted(self, request: Any, route: str | None) -> tuple[Message, str]:
        plane = self.plane
        config = plane.config()
        deadline = time.monotonic() + config.request_timeout_s
        _require_name(request.model_name, "model_name")
        plane.catalog.require(request.model_name)  # 404 before the size check, as REST
        limit = config.max_body_bytes
        size = request.ByteSize()
        if size > limit:
            raise PayloadTooLarge(f"the request is {size} bytes; the limit is {limit} "
                                  f"(Ingress user_config max_body_bytes)")
        parsed, binary = to_request(request)
        prediction = await plane.inference.predict(
            request.model_name, request.model_version or None, parsed, binary, deadline, route)
        return to_response(request, prediction), prediction.version


def route_key(context: GrpcContext) -> str | None:
    """The call's ``x-keel-route-key`` metadata (the traffic split's sticky key), if any."""
    wanted = ROUTE_KEY_HEADER.lower()
    for key, value in context.invocation_metadata() or ():
        if key.lower() == wanted and isinstance(value, str):
            return value
    return None


def _require_name(value: str, field: str) -> None:
    if not value:
        raise InvalidInput(f"{field}: a model name is required")


def _fail(context: GrpcContext, error: KeelError) -> None:
    context.set_code(grpc_code(error))
    context.set_details(error.message)
    trailing = []
    if error.retry_after_s is not None:
        trailing.append(("retry-after", str(error.retry_after_s)))
    if error.stage is not None:
        trailing.append(("keel-stage", error.stage))
    if trailing:
        context.set_trailing_metadata(trailing)

