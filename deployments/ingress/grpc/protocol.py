"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``):
message classes, the server registration Ray Serve calls, and a client stub.

The messages come from ``protocol/grpc_predict_v2.proto``, compiled once into the
descriptor set beside it (``make protos``), and are built in a *private* descriptor
pool: tritonclient and kserve define the same ``inference.*`` names in protobuf's
default pool, and two files defining one name cannot share a pool, so Keel's never
goes there (a process may import Keel's messages and either client library). Only the
ingress replica's gRPC server also registers the file in the default pool, where
Ray's server reflection looks, so ``grpcurl`` can describe the service.
"""

from __future__ import annotations

import copyreg
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

log = logging.getLogger(__name__)

PROTO_DIR = Path(__file__).resolve().parent / "proto"
PROTO_FILE = PROTO_DIR / "grpc_predict_v2.proto"
DESCRIPTOR_SET = PROTO_DIR / "grpc_predict_v2.binpb"
SERVICE = "inference.GRPCInferenceService"

#: Each method of the service: its request and response message names.
METHODS: dict[str, tuple[str, str]] = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
}


def _load() -> tuple[descriptor_pb2.FileDescriptorProto, dict[str, type[Message]]]:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    (proto,) = files.file
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(proto.SerializeToString())
    classes: dict[str, type[Message]] = {}
    for message in proto.message_type:
        descriptor = pool.FindMessageTypeByName(f"{proto.package}.{message.name}")
        classes[message.name] = message_factory.GetMessageClass(descriptor)
    return proto, classes


_FILE, _CLASSES = _load()


def _rebuilt(name: str, data: bytes) -> Message:
    """A message of the protocol from its name and wire bytes (what pickle stores)."""
    return _CLASSES[name].FromString(data)


def _reduced(message: Message) -> tuple[Callable[[str, bytes], Message], tuple[str, bytes]]:
    return _rebuilt, (message.DESCRIPTOR.name, message.SerializeToString())


# A class from a private pool has no importable module (pickle looks it up on
# ``__main__`` and fails), yet Ray pickles a request on some paths: HAProxy sends a call
# to Serve's own gRPC proxy (the backend's backup server) while it counts a replica
# down, and that proxy pickles the request to pass it on. Pickled by name and bytes
# instead, every message crosses any process that imports this module.
for _class in _CLASSES.values():
    copyreg.pickle(_class, _reduced)


def message(name: str) -> type[Message]:
    """The class of one message of the protocol (``"ModelInferRequest"``...)."""
    return _CLASSES[name]


ServerLiveResponse = message("ServerLiveResponse")
ServerReadyResponse = message("ServerReadyResponse")
ModelReadyRequest = message("ModelReadyRequest")
ModelReadyResponse = message("ModelReadyResponse")
ServerMetadataRequest = message("ServerMetadataRequest")
ServerMetadataResponse = message("ServerMetadataResponse")
ModelMetadataRequest = message("ModelMetadataRequest")
ModelMetadataResponse = message("ModelMetadataResponse")
ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")


def method_path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def add_inference_servicer(servicer: Any, server: Any) -> None:
    """Register the service on a gRPC server (``grpc_options.grpc_servicer_functions``
    in serve_config.yaml names this function). Ray Serve replaces each handler with its
    own that calls the ingress deployment's method of the same name."""
    _register_for_reflection()
    add_handlers(servicer, server)


def add_handlers(servicer: Any, server: Any) -> None:
    """The service's handlers on ``server``, each calling ``servicer``'s method of the
    same name (``add_inference_servicer`` without touching the default pool)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=message(request).FromString,
            response_serializer=message(response).SerializeToString,
        )
        for name, (request, response) in METHODS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _register_for_reflection() -> None:
    """Put the file in protobuf's default pool (where server reflection looks) when that
    pool has no other definition of the protocol; else reflection lists the service
    without describing it, and ``grpcurl`` needs ``-proto`` (logged)."""
    default = descriptor_pool.Default()
    try:
        default.FindFileByName(_FILE.name)
        return
    except KeyError:
        pass
    try:
        default.AddSerializedFile(_FILE.SerializeToString())
    except (TypeError, ValueError) as exc:
        log.info("gRPC reflection cannot describe %s in this process (%s); clients use "
                 "the .proto file", SERVICE, exc)


class InferenceStub:
    """A client of the service on a ``grpc`` or ``grpc.aio`` channel: one callable per
    method, e.g. ``await stub.ModelInfer(request, timeout=2)``."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        for name, (request, response) in METHODS.items():
            call: Callable[..., Any] = channel.unary_unary(
                method_path(name),
                request_serializer=message(request).SerializeToString,
                response_deserializer=message(response).FromString,
            )
            setattr(self, name, call)

    def __getattr__(self, name: str) -> Callable[..., Any]:  # for type checkers
        raise AttributeError(name)
