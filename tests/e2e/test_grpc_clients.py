"""The Open Inference Protocol over gRPC with the clients users already have:
``tritonclient.grpc`` and Keel's own stub (typed contents), through HAProxy's gRPC port,
answers equal to REST's for the same rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from deployments.ingress.grpc import protocol as pb
from tests.support.serve_app import KeelApp

pytestmark = pytest.mark.slow

DEMO_MODELS = ["risk_mlp", "risk_gbdt", "risk_mlp_int8"]


@pytest.fixture(scope="module")
def triton(keel_app: KeelApp) -> Iterator[Any]:
    client = triton_grpc.InferenceServerClient(url=keel_app.grpc_target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(keel_app: KeelApp) -> Iterator[pb.InferenceStub]:
    with grpc.insecure_channel(keel_app.grpc_target) as channel:
        yield pb.InferenceStub(channel)


def features(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 12)).astype(np.float32)


def rest_outputs(keel_app: KeelApp, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    body = {"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}
    answer = httpx.post(f"{keel_app.base_url}/v2/models/{name}/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"])
            for o in answer.json()["outputs"]}


def test_server_live_ready_and_metadata(triton: Any) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta.name == "keel"
    assert "binary_tensor_data" in meta.extensions


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_model_metadata_ready_and_raw_infer_equal_rest(triton: Any, keel_app: KeelApp,
                                                       name: str) -> None:
    assert triton.is_model_ready(name)
    assert triton.is_model_ready(name, "1")
    meta = triton.get_model_metadata(name)
    assert meta.name == name and "1" in meta.versions
    assert meta.inputs[0].name == "features" and meta.inputs[0].datatype == "FP32"
    assert list(meta.inputs[0].shape) == [-1, 12]
    x = features(8, seed=31)
    tensor = triton_grpc.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # raw_input_contents
    result = triton.infer(name, inputs=[tensor], request_id="grpc-1")
    response = result.get_response()
    assert response.id == "grpc-1" and response.model_name == name
    assert response.model_version == "1"
    expected = rest_outputs(keel_app, name, x)
    for output, want in expected.items():
        got = result.as_numpy(output)
        assert got is not None and got.shape == want.shape, output
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_typed_contents_answer_typed_contents_equal_rest(stub: pb.InferenceStub,
                                                         keel_app: KeelApp, name: str) -> None:
    x = features(5, seed=32)
    request = pb.ModelInferRequest(model_name=name, id="typed-1")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[5, 12])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    request.outputs.add(name="probabilities")
    response = stub.ModelInfer(request, timeout=30)
    assert response.id == "typed-1" and not response.raw_output_contents
    (output,) = response.outputs
    assert output.name == "probabilities" and output.datatype == "FP32"
    got = np.asarray(output.contents.fp32_contents).reshape(list(output.shape))
    np.testing.assert_allclose(got, rest_outputs(keel_app, name, x)["probabilities"],
                               rtol=1e-6, atol=1e-6)


def test_a_pinned_version_and_parameters_pass_through(triton: Any) -> None:
    x = features(3, seed=33)
    tensor = triton_grpc.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = triton.infer("risk_mlp", inputs=[tensor], model_version="1",
                          outputs=[triton_grpc.InferRequestedOutput("label")],
                          parameters={"note": "kept", "retries": 1})
    response = result.get_response()
    assert response.model_version == "1"
    assert [o.name for o in response.outputs] == ["label"]
    assert response.parameters["cache"].string_param in ("hit", "miss", "partial", "off")
