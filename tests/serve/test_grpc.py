"""The Open Inference Protocol over gRPC on the real application, through HAProxy's gRPC
port and Serve's direct ingress: bad input gets the right status code naming the field
(and the next call is answered), a client deadline cancels the work downstream, and
coalescing and the prediction cache apply to gRPC calls as to REST ones. The kserve
SDK's ``InferenceGRPCClient`` is exercised in its own process (its proto and
tritonclient's cannot share one)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from deployments.ingress.auth import hash_key
from deployments.ingress.grpc import protocol as pb
from tests.support.modelkit import raw_infer_request as raw_request
from tests.support.serve_app import (
    APP_NAME,
    SLOW_BATCH_S,
    KeelApp,
    changed,
    serve_test_config,
    served_rows,
)

pytestmark = pytest.mark.slow


class ToApplication(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Names the application in every call's metadata, as a client must while Serve runs
    more than one (other test modules deploy theirs alongside, and HAProxy's routes
    follow a removal with a delay)."""

    def __init__(self, app: str) -> None:
        self.app = app

    def _named(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), ("application", self.app)])

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                              request: Any) -> Any:
        return continuation(self._named(client_call_details), request)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                request_iterator: Any) -> Any:  # server reflection
        return continuation(self._named(client_call_details), request_iterator)


@pytest.fixture(scope="module")
def stub(keel_app: KeelApp) -> Iterator[pb.InferenceStub]:
    with grpc.insecure_channel(keel_app.grpc_target) as channel:
        yield pb.InferenceStub(grpc.intercept_channel(channel, ToApplication(APP_NAME)))


def rows(n: int, seed: int, width: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


def with_nan() -> np.ndarray:
    x = rows(2, seed=3)
    x[0, 5] = np.nan
    return x


BAD = [
    ("unknown model", raw_request("nope", rows(1, 1)), grpc.StatusCode.NOT_FOUND, ["'nope'"]),
    ("unknown version", raw_request("risk_mlp", rows(1, 1), model_version="7"),
     grpc.StatusCode.NOT_FOUND, ["'7'"]),
    ("wrong input name", raw_request("risk_mlp", rows(1, 1), name="x"),
     grpc.StatusCode.INVALID_ARGUMENT, ["'x'", "features"]),
    ("wrong shape", raw_request("risk_mlp", rows(1, 1, width=11)),
     grpc.StatusCode.INVALID_ARGUMENT, ["'features'", "[1, 11]"]),
    ("wrong datatype", raw_request("risk_gbdt", rows(1, 1), datatype="INT32"),
     grpc.StatusCode.INVALID_ARGUMENT, ["'features'", "INT32"]),
    ("raw contents of the wrong length", raw_request("risk_mlp", rows(1, 1), raw=b"\0" * 40),
     grpc.StatusCode.INVALID_ARGUMENT, ["'features'", "40 bytes"]),
    ("NaN where forbidden", raw_request("risk_mlp", with_nan()),
     grpc.StatusCode.INVALID_ARGUMENT, ["'features'", "NaN"]),
]


@pytest.mark.parametrize(("what", "request_", "code", "named"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_over_grpc_names_the_field_and_the_next_call_is_answered(
        stub: pb.InferenceStub, what: str, request_: Any, code: grpc.StatusCode,
        named: list[str]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_, timeout=30)
    error: Any = caught.value
    assert error.code() == code, (what, error.details())
    for text in named:
        assert text in error.details(), (what, error.details())
    good = stub.ModelInfer(raw_request("risk_mlp", rows(1, seed=2)), timeout=30)
    assert good.model_name == "risk_mlp" and len(good.raw_output_contents) == 2


def test_an_oversized_message_is_resource_exhausted_naming_the_limit(
        stub: pb.InferenceStub, keel_app: KeelApp) -> None:
    """Just over max_body_bytes: Keel's answer naming the knob. Far over it: refused by
    Serve's gRPC server (the application's RAY_SERVE_GRPC_MAX_MESSAGE_SIZE) unread."""
    limit = keel_app.deployment("Ingress")["user_config"]["max_body_bytes"]
    ceiling = int(keel_app.config["applications"][0]["runtime_env"]["env_vars"][
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"])
    for rows_, says in ((limit // (12 * 4) + 1, "max_body_bytes"),
                        (ceiling // (12 * 4) + 1, "larger than max")):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(raw_request("risk_mlp", rows(rows_, seed=4)), timeout=60)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert says in error.details(), error.details()
        assert stub.ModelInfer(raw_request("risk_mlp", rows(2, seed=4)), timeout=30).outputs


def test_a_client_deadline_cancels_the_work_downstream(stub: pb.InferenceStub,
                                                       keel_app: KeelApp) -> None:
    """linear waits SLOW_BATCH_S for a batch to fill; the client gives up long before:
    the call is cancelled in the ingress and its rows never reach a batch."""
    with changed(keel_app, linear={"batch_wait_timeout_s": SLOW_BATCH_S}):
        before = served_rows("linear")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(raw_request("linear", rows(1, seed=5, width=4)), timeout=0.3)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < SLOW_BATCH_S
        time.sleep(SLOW_BATCH_S * 2.5)
        assert served_rows("linear") == before, "the abandoned call still ran"


def _coalescing(base_url: str, model: str) -> dict[str, Any]:
    answer = httpx.get(f"{base_url}/v2/models/{model}", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["parameters"]["coalescing"]  # type: ignore[no-any-return]


def test_concurrent_grpc_calls_are_coalesced_and_cached(stub: pb.InferenceStub,
                                                        keel_app: KeelApp) -> None:
    """risk_mlp (in the ingress; its rows always go through the cache in the tests):
    concurrent gRPC calls share ONNX Runtime runs, and a repeated row is a cache hit."""
    before = _coalescing(keel_app.base_url, "risk_mlp")
    xs = [rows(1, seed=700 + i) for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(
            lambda x: stub.ModelInfer(raw_request("risk_mlp", x), timeout=30), xs))
    assert {a.parameters["cache"].string_param for a in answers} == {"miss"}
    after = _coalescing(keel_app.base_url, "risk_mlp")
    assert after["items"] - before["items"] == 64
    assert after["batches"] - before["batches"] < 64
    deadline = time.monotonic() + 10  # the cache is written after the answer
    while time.monotonic() < deadline:
        again = stub.ModelInfer(raw_request("risk_mlp", xs[0]), timeout=30)
        if again.parameters["cache"].string_param == "hit":
            break
        time.sleep(0.1)
    else:
        pytest.fail("a repeated row was never a cache hit over gRPC")
    np.testing.assert_array_equal(
        np.frombuffer(again.raw_output_contents[0], "<f4"),
        np.frombuffer(answers[0].raw_output_contents[0], "<f4"))
    final = _coalescing(keel_app.base_url, "risk_mlp")
    assert final["items"] - after["items"] < 100  # hits never reach the model


KSERVE_CLIENT = textwrap.dedent("""
    import asyncio, json, sys
    import numpy as np
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def main(target, rows):
        client = InferenceGRPCClient(url=target, timeout=30)
        app = [("application", "keel")]  # names the Serve application (see ToApplication)
        out = {"live": await client.is_server_live(headers=app),
               "ready": await client.is_server_ready(headers=app),
               "model_ready": await client.is_model_ready("risk_gbdt", headers=app)}
        x = np.asarray(rows, dtype=np.float32)
        tensor = InferInput(name="features", shape=list(x.shape), datatype="FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        answer = await client.infer(InferRequest(model_name="risk_gbdt", infer_inputs=[tensor],
                                                 request_id="ks-1"), headers=app)
        out["id"] = answer.id
        out["outputs"] = {o.name: o.as_numpy().tolist() for o in answer.outputs}
        await client.close()
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
""")


def test_the_kserve_sdks_grpc_client_gets_rests_answers(keel_app: KeelApp) -> None:
    x = rows(4, seed=6)
    done = subprocess.run([sys.executable, "-c", KSERVE_CLIENT, keel_app.grpc_target,
                           json.dumps(x.tolist())], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["live"] and got["ready"] and got["model_ready"] and got["id"] == "ks-1"
    body = {"inputs": [{"name": "features", "shape": [4, 12], "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}
    rest = httpx.post(f"{keel_app.base_url}/v2/models/risk_gbdt/infer", json=body, timeout=30)
    assert rest.status_code == 200, rest.text
    for output in rest.json()["outputs"]:
        np.testing.assert_allclose(np.asarray(got["outputs"][output["name"]]).reshape(-1),
                                   np.asarray(output["data"]).reshape(-1), rtol=1e-6)


def test_server_reflection_describes_the_service(keel_app: KeelApp) -> None:
    """What grpcurl and grpcui ask: the service and its methods, without the .proto."""
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(keel_app.grpc_target) as channel:
        database = ProtoReflectionDescriptorDatabase(
            grpc.intercept_channel(channel, ToApplication(APP_NAME)))
        assert pb.SERVICE in database.get_services()
        service = descriptor_pool.DescriptorPool(database).FindServiceByName(pb.SERVICE)
        assert {m.name for m in service.methods} == set(pb.METHODS)
        infer = service.methods_by_name["ModelInfer"]
        assert infer.input_type.fields_by_name["raw_input_contents"].number == 7


AUTH_APP = "keel-grpc-auth"


def test_api_keys_over_grpc_come_from_the_metadata(keel_app: KeelApp,
                                                   model_repo: Path) -> None:
    """A second application with KEEL_AUTH=on; gRPC picks it by the ``application``
    metadata (with two applications, Serve's HAProxy needs it to route)."""
    app = serve_test_config(model_repo)["applications"][0]
    keys = [{"name": "all", "sha256": hash_key("k-all")},
            {"name": "gbdt-only", "sha256": hash_key("k-gbdt"), "models": ["risk_gbdt"]}]
    app.update(name=AUTH_APP, route_prefix="/grpc-auth", runtime_env={"env_vars": {
        **app["runtime_env"]["env_vars"], "KEEL_AUTH": "on", "KEEL_API_KEYS": json.dumps(keys)}})
    app["args"].update(models=["linear"], llm=False, placement={})
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("Ingress", "SloMonitor", "linear")]
    next(d for d in app["deployments"] if d["name"] == "Ingress")["user_config"]["models"] = {}
    with keel_app.alongside(app), grpc.insecure_channel(keel_app.grpc_target) as channel:
        stub = pb.InferenceStub(channel)
        to_app = (("application", AUTH_APP),)
        request = raw_request("linear", rows(1, seed=8, width=4))

        def code_of(metadata: tuple[tuple[str, str], ...]) -> tuple[Any, str]:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, metadata=to_app + metadata, timeout=30)
            error: Any = caught.value
            return error.code(), error.details()

        code, details = code_of(())
        assert code == grpc.StatusCode.UNAUTHENTICATED and "API key is required" in details
        code, _ = code_of((("authorization", "Bearer wrong"),))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, details = code_of((("authorization", "Bearer k-gbdt"),))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'linear'" in details
        answer = stub.ModelInfer(request, timeout=30,
                                 metadata=(*to_app, ("authorization", "Bearer k-all")))
        assert answer.model_name == "linear"
        assert stub.ServerLive(pb.message("ServerLiveRequest")(), metadata=to_app,
                               timeout=30).live


def test_grpc_calls_are_counted_like_rest_requests(stub: pb.InferenceStub,
                                                   keel_app: KeelApp) -> None:
    """Keel's request metrics (and so its SLO events) cover gRPC calls: route = the
    method's path, the model, and the HTTP status the call's code stands for."""
    import re

    for i in range(5):
        stub.ModelInfer(raw_request("risk_gbdt", rows(1, seed=900 + i)), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(raw_request("risk_gbdt", rows(1, 1), name="x"), timeout=30)
    route = r'http_route="/inference\.GRPCInferenceService/ModelInfer"'
    ok = re.compile(r'ray_keel_requests_total\{[^}]*' + route +
                    r'[^}]*model="risk_gbdt"[^}]*status="200"[^}]*\} (\d+(\.\d+)?)')
    bad = re.compile(r'ray_keel_requests_total\{[^}]*' + route +
                     r'[^}]*model="risk_gbdt"[^}]*status="400"')
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:  # Ray exports every few seconds
        text = httpx.get(f"http://127.0.0.1:{keel_app.client.metrics_port}/metrics",
                         timeout=10).text
        found = ok.search(text)
        if found and float(found.group(1)) >= 5 and bad.search(text):
            return
        time.sleep(2)
    pytest.fail("gRPC calls not in ray_keel_requests_total: "
                + "\n".join(line for line in text.splitlines() if "GRPCInference" in line))
