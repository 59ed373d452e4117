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
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from deployments.ingress import grpc_protocol as pb
from tests.conftest import KeelApp
from tests.serve.test_backpressure import SLOW_BATCH_S, changed, served_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stub(keel_app: KeelApp) -> Iterator[pb.InferenceStub]:
    with grpc.insecure_channel(keel_app.grpc_target) as channel:
        yield pb.InferenceStub(channel)


def rows(n: int, seed: int, width: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


def raw_request(model: str, x: np.ndarray, *, name: str = "features", datatype: str = "FP32",
                shape: list[int] | None = None, raw: bytes | None = None,
                version: str = "") -> Any:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype=datatype,
                       shape=list(x.shape) if shape is None else shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes() if raw is None else raw)
    return request


def with_nan() -> np.ndarray:
    x = rows(2, seed=3)
    x[0, 5] = np.nan
    return x


BAD = [
    ("unknown model", raw_request("nope", rows(1, 1)), grpc.StatusCode.NOT_FOUND, ["'nope'"]),
    ("unknown version", raw_request("risk_mlp", rows(1, 1), version="7"),
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
    limit = keel_app.deployment("Ingress")["user_config"]["max_body_bytes"]
    x = rows(limit // (12 * 4) + 1, seed=4)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(raw_request("risk_mlp", x), timeout=60)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "max_body_bytes" in error.details() or "larger than max" in error.details()
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
        out = {"live": await client.is_server_live(),
               "ready": await client.is_server_ready(),
               "model_ready": await client.is_model_ready("risk_gbdt")}
        x = np.asarray(rows, dtype=np.float32)
        tensor = InferInput(name="features", shape=list(x.shape), datatype="FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        answer = await client.infer(InferRequest(model_name="risk_gbdt", infer_inputs=[tensor],
                                                 request_id="ks-1"))
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
