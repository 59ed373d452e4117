"""The Open Inference Protocol over gRPC on the data plane, without Ray: a real grpc.aio
server in this process, Keel's service on a real ``DataPlane`` (real ONNX models, the real
prediction cache on the machine's Redis), called through a real channel."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from deployments.cache.core import PredictionCache
from deployments.cache.policy import CacheConfig
from deployments.contracts import InferCall, InferResult
from deployments.errors import KeelError
from deployments.ingress.auth import ApiKey, AuthConfig, hash_key
from deployments.ingress.dataplane.config import IngressConfig
from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.grpc import protocol as pb
from deployments.ingress.grpc.servicer import GRPC_CODES, GrpcOip, to_request
from deployments.ingress.pool.placement import EmbeddedModels, ModelPool
from deployments.onnx.core import OnnxModelConfig
from deployments.repository import ModelRepository
from deployments.storage.remote import redis_store
from tests.support.inprocess import InProcessModels, MutableIngressConfig
from tests.support.modelkit import raw_infer_request as raw_request
from tests.support.modelkit import reference_probabilities

REDIS_URL = "redis://127.0.0.1:6379/0"  # the machine's (tests/unit/conftest.py)

ATOL = 1e-5
INFER = "/inference.GRPCInferenceService/ModelInfer"


class SlowRemote(InProcessModels):
    """``fixed`` and ``nanok`` behind a backend (as behind a handle) that takes
    ``delay_s``; counts the calls that start and the ones that finish."""

    def __init__(self, repository: ModelRepository) -> None:
        super().__init__(repository)
        self.versions = {n: v for n, v in self.versions.items() if n in ("fixed", "nanok")}
        self.delay_s = 0.0
        self.started: list[int] = []
        self.finished = 0

    async def infer_many(self, name: str, calls: list[InferCall]
                         ) -> Sequence[InferResult | KeelError]:
        self.started.append(len(calls))
        await asyncio.sleep(self.delay_s if self.delay_s else 0)
        self.finished += 1
        return await super().infer_many(name, calls)


@dataclass
class Observed:
    """What the service reports per call (the request observer's view)."""

    calls: list[tuple[str, str, int]] = field(default_factory=list)

    def request(self, http_route: str, model: str, status: int, latency_ms: float,
                version: str = "") -> None:
        self.calls.append((http_route, model, status))


@dataclass
class Served:
    stub: pb.InferenceStub
    plane: DataPlane
    config: MutableIngressConfig
    remote: SlowRemote
    observed: Observed
    auth: list[AuthConfig]


class Servicer:
    def __init__(self, oip: GrpcOip) -> None:
        for method in pb.METHODS:
            setattr(self, method, self._bound(oip, method))

    @staticmethod
    def _bound(oip: GrpcOip, method: str) -> Any:
        async def handler(request: Any, context: Any) -> Any:
            return await oip.call(method, request, context)
        return handler



@pytest.fixture
async def served(repository: ModelRepository, prefix: str) -> AsyncIterator[Served]:
    embedded = EmbeddedModels(repository, ["linear"])
    embedded.apply({"linear": OnnxModelConfig(version="1")})
    remote = SlowRemote(repository)
    config = MutableIngressConfig(IngressConfig(
        cache=CacheConfig(key_prefix=prefix, policy="never", models={"nanok": "always"})))
    cache = PredictionCache(redis_store(REDIS_URL), config.value.cache)
    plane = DataPlane(ModelPool(embedded, remote), config, cache=cache)
    observed = Observed()
    auth = [AuthConfig()]
    server = grpc.aio.server()
    pb.add_handlers(Servicer(GrpcOip(plane, lambda: auth[0], observed)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(pb.InferenceStub(channel), plane, config, remote, observed, auth)
    finally:
        await channel.close()
        await server.stop(None)


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def probabilities(response: Any) -> np.ndarray:
    names = [o.name for o in response.outputs]
    index = names.index("probabilities")
    output = response.outputs[index]
    if response.raw_output_contents:
        flat = np.frombuffer(response.raw_output_contents[index], dtype="<f4")
    else:
        flat = np.asarray(output.contents.fp32_contents, dtype=np.float32)
    return flat.reshape(list(output.shape))


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# --- the protocol's files -------------------------------------------------------------


def test_the_descriptor_set_is_compiled_from_the_proto_file(tmp_path: Path) -> None:
    """``make protos`` was run after the last edit of the .proto file."""
    out = tmp_path / "set.binpb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{pb.PROTO_DIR}",
                    f"--descriptor_set_out={out}", str(pb.PROTO_FILE)], check=True)
    assert out.read_bytes() == pb.DESCRIPTOR_SET.read_bytes(), "run `make protos`"


def test_messages_are_wire_compatible_with_tritonclients() -> None:
    from tritonclient.grpc import service_pb2 as triton

    ours = raw_request("linear", rows(2, seed=1), id="w-1")
    ours.parameters["k"].string_param = "v"
    theirs = triton.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "linear" and theirs.id == "w-1"
    assert theirs.inputs[0].name == "features" and list(theirs.inputs[0].shape) == [2, 4]
    assert theirs.parameters["k"].string_param == "v"
    assert theirs.raw_input_contents == ours.raw_input_contents
    reply = triton.ModelInferResponse(model_name="m", model_version="2", id="x")
    reply.outputs.add(name="o", datatype="FP32", shape=[1]).contents.fp32_contents.append(0.5)
    back = pb.ModelInferResponse.FromString(reply.SerializeToString())
    assert back.model_version == "2" and back.outputs[0].contents.fp32_contents[0] == 0.5


# --- answers --------------------------------------------------------------------------


async def test_probes_and_metadata(served: Served) -> None:
    assert (await served.stub.ServerLive(pb.message("ServerLiveRequest")())).live
    assert (await served.stub.ServerReady(pb.message("ServerReadyRequest")())).ready
    meta = await served.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "keel" and "binary_tensor_data" in meta.extensions
    model = await served.stub.ModelMetadata(pb.ModelMetadataRequest(name="linear"))
    assert model.name == "linear" and list(model.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == \
        [("features", "FP32", [-1, 4])]
    assert (await served.stub.ModelReady(pb.ModelReadyRequest(name="linear"))).ready
    assert (await served.stub.ModelReady(pb.ModelReadyRequest(name="linear", version="1"))
            ).ready
    assert not (await served.stub.ModelReady(pb.ModelReadyRequest(name="linear",
                                                                  version="2"))).ready


async def test_raw_and_typed_infer_answer_what_the_model_computes(served: Served) -> None:
    x = rows(3, seed=2)
    want = reference_probabilities(x, seed=0)
    raw = await served.stub.ModelInfer(raw_request("linear", x, id="r-1"))
    assert raw.id == "r-1" and raw.model_version == "1" and len(raw.raw_output_contents) == 2
    np.testing.assert_allclose(probabilities(raw), want, atol=ATOL)
    typed = pb.ModelInferRequest(model_name="linear")
    typed.inputs.add(name="features", datatype="FP32",
                     shape=[3, 4]).contents.fp32_contents.extend(x.reshape(-1).tolist())
    typed.outputs.add(name="probabilities")
    answer = await served.stub.ModelInfer(typed)
    assert not answer.raw_output_contents and [o.name for o in answer.outputs] == \
        ["probabilities"]
    np.testing.assert_allclose(probabilities(answer), want, atol=ATOL)
    assert served.observed.calls[-1] == (INFER, "linear", 200)


async def test_concurrent_calls_are_coalesced_and_cached_as_rest_calls_are(
        served: Served) -> None:
    served.remote.delay_s = 0.05
    xs = [rows(1, seed=100 + i) for i in range(8)]
    first = await asyncio.gather(*(served.stub.ModelInfer(raw_request("nanok", x))
                                   for x in xs))
    assert len(served.remote.started) < 8 and sum(served.remote.started) == 8
    assert {a.parameters["cache"].string_param for a in first} == {"miss"}
    counters = served.plane.cache.counters if served.plane.cache else None
    assert counters is not None and counters.misses["nanok"] == 8

    async def cached() -> bool:  # the write-back runs after the answer
        again = await served.stub.ModelInfer(raw_request("nanok", xs[0]))
        return again.parameters["cache"].string_param == "hit"

    for _ in range(50):
        if await cached():
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the row was never served from the cache")
    assert counters.hits["nanok"] >= 1
    assert sum(served.remote.started) == 8  # the hit made no model call


# --- bad input: each the right code, naming the field; the next call answered ----------


def _bad(model: str = "linear", x: np.ndarray | None = None, **overrides: Any) -> Any:
    return raw_request(model, rows(2, seed=3) if x is None else x, **overrides)


def _typed(field_name: str, values: list[Any], datatype: str = "FP32") -> Any:
    request = pb.ModelInferRequest(model_name="linear")
    tensor = request.inputs.add(name="features", datatype=datatype, shape=[1, 4])
    getattr(tensor.contents, field_name).extend(values)
    return request


def _nan_rows() -> np.ndarray:
    x = rows(2, seed=4)
    x[1, 2] = np.nan
    return x


BAD_INPUTS: list[tuple[str, Any, grpc.StatusCode, list[str]]] = [
    ("unknown model", _bad("nope"), grpc.StatusCode.NOT_FOUND, ["'nope'"]),
    ("unknown version", _bad(model_version="9"), grpc.StatusCode.NOT_FOUND, ["'9'", "linear"]),
    ("no model name", pb.ModelInferRequest(), grpc.StatusCode.INVALID_ARGUMENT, ["model_name"]),
    ("wrong input name", _bad(name="feats"), grpc.StatusCode.INVALID_ARGUMENT,
     ["'feats'", "features"]),
    ("wrong shape", _bad(shape=[2, 5], raw=rows(2, 0).tobytes() + b"\0" * 8),
     grpc.StatusCode.INVALID_ARGUMENT, ["'features'", "[2, 5]"]),
    ("wrong datatype", _bad(datatype="FP64"), grpc.StatusCode.INVALID_ARGUMENT,
     ["'features'", "FP64"]),
    ("raw contents of the wrong length", _bad(raw=b"\0" * 12),
     grpc.StatusCode.INVALID_ARGUMENT, ["'features'", "12 bytes", "32"]),
    ("NaN where forbidden", _bad(x=_nan_rows()), grpc.StatusCode.INVALID_ARGUMENT,
     ["'features'", "NaN"]),
    ("typed data in the wrong field", _typed("int_contents", [1, 2, 3, 4]),
     grpc.StatusCode.INVALID_ARGUMENT, ["'features'", "fp32_contents", "int_contents"]),
    ("typed data of the wrong count", _typed("fp32_contents", [1.0, 2.0]),
     grpc.StatusCode.INVALID_ARGUMENT, ["'features'", "2 elements"]),
    ("FP16 as typed contents", _typed("fp32_contents", [1.0] * 4, datatype="FP16"),
     grpc.StatusCode.INVALID_ARGUMENT, ["'features'", "raw_input_contents"]),
]


@pytest.mark.parametrize(("what", "request_", "code", "named"), BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_gets_its_status_naming_the_field(
        served: Served, what: str, request_: Any, code: grpc.StatusCode,
        named: list[str]) -> None:
    error = await failure(served.stub.ModelInfer(request_))
    assert error.code() == code, error.details()
    for text in named:
        assert text in (error.details() or ""), (what, error.details())
    good = await served.stub.ModelInfer(raw_request("linear", rows(1, seed=5)))
    assert good.model_name == "linear"


async def test_raw_contents_must_match_the_inputs_one_to_one(served: Served) -> None:
    request = raw_request("linear", rows(1, seed=6))
    request.raw_input_contents.append(b"\0" * 16)
    error = await failure(served.stub.ModelInfer(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents has 2 entries for 1 inputs" in (error.details() or "")
    mixed = raw_request("linear", rows(1, seed=6))
    mixed.inputs[0].contents.fp32_contents.extend([1.0] * 4)
    error = await failure(served.stub.ModelInfer(mixed))
    assert "typed contents" in (error.details() or "")


async def test_an_oversized_message_is_resource_exhausted_naming_the_limit(
        served: Served) -> None:
    served.config.value = served.config.value.model_copy(update={"max_body_bytes": 1024})
    error = await failure(served.stub.ModelInfer(raw_request("linear", rows(100, seed=7))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_body_bytes" in (error.details() or "")
    assert (await served.stub.ModelInfer(raw_request("linear", rows(2, seed=7)))).outputs


async def test_nan_is_accepted_where_the_model_allows_it(served: Served) -> None:
    answer = await served.stub.ModelInfer(raw_request("nanok", _nan_rows()))
    assert answer.model_name == "nanok"


def test_every_keel_status_has_a_grpc_code() -> None:
    assert GRPC_CODES[400] == grpc.StatusCode.INVALID_ARGUMENT
    assert GRPC_CODES[404] == grpc.StatusCode.NOT_FOUND
    assert GRPC_CODES[413] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert GRPC_CODES[503] == grpc.StatusCode.UNAVAILABLE
    assert GRPC_CODES[504] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert GRPC_CODES[401] == grpc.StatusCode.UNAUTHENTICATED
    assert GRPC_CODES[403] == grpc.StatusCode.PERMISSION_DENIED


def test_to_request_refuses_a_request_without_inputs() -> None:
    from deployments.errors import InvalidInput

    with pytest.raises(InvalidInput, match="inputs"):
        to_request(pb.ModelInferRequest(model_name="linear"))


# --- time: Keel's budget and the client's deadline -------------------------------------


async def test_keels_budget_is_deadline_exceeded_naming_the_stage(served: Served) -> None:
    served.remote.delay_s = 1.0
    served.config.value = served.config.value.model_copy(update={"request_timeout_s": 0.2})
    call = served.stub.ModelInfer(raw_request("nanok", rows(1, seed=8)))
    error = await failure(call)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "'nanok'" in (error.details() or "")
    assert ("keel-stage", "model") in tuple(error.trailing_metadata() or ())
    assert served.observed.calls[-1] == (INFER, "nanok", 504)


async def test_a_client_deadline_cancels_the_work_downstream(served: Served) -> None:
    served.remote.delay_s = 1.0
    error = await failure(served.stub.ModelInfer(raw_request("nanok", rows(1, seed=9)),
                                                 timeout=0.2))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(1.5)  # past the model's delay: had it gone on, it would be done
    assert served.remote.started == [1] and served.remote.finished == 0
    assert served.observed.calls[-1] == (INFER, "nanok", 499)


async def test_past_max_requests_a_call_is_unavailable_with_retry_after(
        served: Served) -> None:
    """Keel's admission limit holds over gRPC as over REST: UNAVAILABLE with ``retry-after``
    (Ray's own back-pressure would say RESOURCE_EXHAUSTED without it), the probes answer."""
    served.remote.delay_s = 0.5
    served.config.value = served.config.value.model_copy(update={"max_requests": 1})
    held = asyncio.ensure_future(served.stub.ModelInfer(raw_request("nanok", rows(1, seed=10))))
    await asyncio.sleep(0.1)
    error = await failure(served.stub.ModelInfer(raw_request("nanok", rows(1, seed=11))))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "max_requests" in (error.details() or "")
    assert ("retry-after", "1") in tuple(error.trailing_metadata() or ())
    assert (await served.stub.ServerLive(pb.message("ServerLiveRequest")())).live
    assert probabilities(await held).shape == (1, 2)
    assert served.remote.started == [1]  # the refused call never reached the model
    assert served.observed.calls[-1][2] == 200 and (INFER, "nanok", 503) in \
        served.observed.calls


# --- API keys from the metadata --------------------------------------------------------


async def test_api_keys_come_from_the_authorization_metadata(served: Served) -> None:
    served.auth[0] = AuthConfig(enabled=True, keys=(
        ApiKey(name="all", sha256=hash_key("k-all")),
        ApiKey(name="nan-only", sha256=hash_key("k-nan"), models=("nanok",))))
    request = raw_request("linear", rows(1, seed=10))
    missing = await failure(served.stub.ModelInfer(request))
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "API key is required" in (missing.details() or "")
    wrong = await failure(served.stub.ModelInfer(
        request, metadata=(("authorization", "Bearer nope"),)))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    other = await failure(served.stub.ModelInfer(
        request, metadata=(("authorization", "Bearer k-nan"),)))
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'linear'" in (other.details() or "")
    denied_metadata = await failure(served.stub.ModelMetadata(
        pb.ModelMetadataRequest(name="linear"), metadata=(("x-api-key", "k-nan"),)))
    assert denied_metadata.code() == grpc.StatusCode.PERMISSION_DENIED
    ok = await served.stub.ModelInfer(request, metadata=(("authorization", "Bearer k-all"),))
    assert ok.model_name == "linear"
    # The probes and the server metadata stay open, as REST's do.
    assert (await served.stub.ServerLive(pb.message("ServerLiveRequest")())).live
    assert (await served.stub.ServerMetadata(pb.ServerMetadataRequest())).name == "keel"


def test_every_message_survives_pickle_and_rays_cloudpickle() -> None:
    """Serve's gRPC proxy pickles a request on its way to a replica (HAProxy's backup
    path); a class from Keel's private pool must survive that (a CI run once failed
    with "Can't pickle <class 'ServerLiveRequest'>")."""
    import pickle

    from ray import cloudpickle

    request = raw_request("linear", np.ones((2, 4), dtype=np.float32))
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        for name in pb.METHODS:
            empty = pb.message(f"{name}Request")()
            assert loads(dumps(empty)) == empty
        back = loads(dumps(request))
        assert type(back) is type(request) and back == request
        assert back.raw_input_contents == request.raw_input_contents
