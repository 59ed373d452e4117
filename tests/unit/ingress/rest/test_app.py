"""The ingress FastAPI app through TestClient, over real ONNX models in process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from deployments.ingress.rest.app import IngressConfig, create_app
from deployments.onnx.core import OnnxModelConfig
from tests.support.inprocess import InProcessModels, MutableIngressConfig
from tests.support.modelkit import reference_probabilities

ATOL = 1e-5


def _rows(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def _payload(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}], **extra}


def _infer(client: TestClient, x: np.ndarray, path: str = "/v2/models/linear/infer",
           **extra: Any) -> httpx.Response:
    return client.post(path, json=_payload(x, **extra))


def _output(document: dict[str, Any], name: str) -> dict[str, Any]:
    [output] = [o for o in document["outputs"] if o["name"] == name]
    return output


def _assert_answer(response: httpx.Response, x: np.ndarray, *, seed: int, version: str,
                   model: str = "linear") -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["model_name"] == model
    assert document["model_version"] == version
    probabilities = _output(document, "probabilities")
    assert probabilities["datatype"] == "FP32"
    assert probabilities["shape"] == [x.shape[0], 2]
    expected = reference_probabilities(x, seed)
    np.testing.assert_allclose(np.array(probabilities["data"]).reshape(-1, 2), expected,
                               atol=ATOL)
    label = _output(document, "label")
    assert label["datatype"] == "INT64"
    assert label["shape"] == [x.shape[0]]
    assert label["data"] == expected.argmax(axis=1).tolist()


def _assert_error(response: httpx.Response, status: int, *parts: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert list(document) == ["error"], document
    message = document["error"]
    assert isinstance(message, str)
    for part in parts:
        assert part in message, message
    return message


def _assert_still_good(client: TestClient) -> None:
    """No bad request affects the next good one."""
    x = _rows(3, seed=99)
    _assert_answer(_infer(client, x), x, seed=1, version="2")


# --- metadata and health ------------------------------------------------------------------


def test_server_metadata(client: TestClient) -> None:
    response = client.get("/v2")
    assert response.status_code == 200
    document = response.json()
    assert document["name"] == "keel"
    assert isinstance(document["version"], str) and document["version"]
    assert document["extensions"] == ["binary_tensor_data"]


def test_live(client: TestClient) -> None:
    response = client.get("/v2/health/live")
    assert response.status_code == 200
    assert response.json() == {"live": True}


def test_ready(client: TestClient) -> None:
    response = client.get("/v2/health/ready")
    assert response.status_code == 200
    assert response.json() == {
        "ready": True,
        "models": {
            "fixed": {"ready": True, "version": "1", "placement": "deployment"},
            "linear": {"ready": True, "version": "2", "placement": "deployment"},
            "nanok": {"ready": True, "version": "1", "placement": "deployment"},
        },
    }


def test_model_metadata(client: TestClient) -> None:
    response = client.get("/v2/models/linear")
    assert response.status_code == 200
    document = response.json()
    parameters = document.pop("parameters")
    assert document == {
        "name": "linear",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]}],
    }
    assert parameters["served_version"] == "2"
    assert parameters["loaded_versions"] == ["2"]
    assert parameters["decision"] == {"output": "probabilities", "index": 1, "threshold": 0.5}
    assert parameters["metrics"] == {"auc": 0.5}
    assert parameters["providers"][-1] == "CPUExecutionProvider"


def test_model_version_metadata(client: TestClient) -> None:
    response = client.get("/v2/models/linear/versions/2")
    assert response.status_code == 200
    assert response.json()["name"] == "linear"
    assert response.json()["parameters"]["served_version"] == "2"


def test_fixed_model_metadata_shows_the_fixed_batch(client: TestClient) -> None:
    document = client.get("/v2/models/fixed").json()
    assert document["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [1, 4]}]


def test_metadata_of_an_unloaded_version_then_pinned(client: TestClient,
                                                     backend: InProcessModels) -> None:
    _assert_error(client.get("/v2/models/linear/versions/1"), 404, "'1'", "not loaded")
    backend.apply("linear", OnnxModelConfig(version="1"))
    response = client.get("/v2/models/linear/versions/1")
    assert response.status_code == 200, response.text
    parameters = response.json()["parameters"]
    assert parameters["served_version"] == "1"
    assert parameters["loaded_versions"] == ["1", "2"]


def test_metadata_of_unknown_model_and_version(client: TestClient) -> None:
    _assert_error(client.get("/v2/models/nope"), 404, "'nope'")
    _assert_error(client.get("/v2/models/linear/versions/9"), 404, "'9'")


def test_model_ready(client: TestClient) -> None:
    response = client.get("/v2/models/linear/ready")
    assert response.status_code == 200
    assert response.json() == {"name": "linear", "ready": True}
    response = client.get("/v2/models/linear/versions/2/ready")
    assert response.status_code == 200
    assert response.json() == {"name": "linear", "ready": True, "version": "2"}


def test_model_version_ready_follows_what_is_loaded(client: TestClient,
                                                    backend: InProcessModels) -> None:
    response = client.get("/v2/models/linear/versions/1/ready")
    assert response.status_code == 503
    assert response.json() == {"name": "linear", "ready": False, "version": "1"}
    backend.apply("linear", OnnxModelConfig(version="1"))
    backend.apply("linear", OnnxModelConfig(version="2"))
    response = client.get("/v2/models/linear/versions/1/ready")
    assert response.status_code == 200
    assert response.json() == {"name": "linear", "ready": True, "version": "1"}


def test_model_ready_unknown(client: TestClient) -> None:
    _assert_error(client.get("/v2/models/nope/ready"), 404, "'nope'")
    _assert_error(client.get("/v2/models/linear/versions/9/ready"), 404, "'9'")


# --- inference ------------------------------------------------------------------------------


def test_infer_served_version(client: TestClient) -> None:
    x = _rows(5)
    _assert_answer(_infer(client, x), x, seed=1, version="2")


def test_infer_pinned_version(client: TestClient) -> None:
    x = _rows(2)
    _assert_answer(_infer(client, x, "/v2/models/linear/versions/2/infer"), x, seed=1,
                   version="2")


def test_infer_other_models(client: TestClient) -> None:
    x = _rows(3)
    _assert_answer(_infer(client, x, "/v2/models/nanok/infer"), x, seed=2, version="1",
                   model="nanok")
    one = _rows(1)
    _assert_answer(_infer(client, one, "/v2/models/fixed/infer"), one, seed=3, version="1",
                   model="fixed")


def test_infer_echoes_id_and_selects_outputs(client: TestClient) -> None:
    x = _rows(2)
    response = _infer(client, x, id="req-9", outputs=[{"name": "label"}])
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["id"] == "req-9"
    assert document["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [2],
                                    "data": reference_probabilities(x, 1).argmax(1).tolist()}]


def test_infer_pinned_to_previous_version_after_a_swap(client: TestClient,
                                                       backend: InProcessModels) -> None:
    x = _rows(4)
    _assert_error(_infer(client, x, "/v2/models/linear/versions/1/infer"), 404, "'1'",
                  "not loaded")
    backend.apply("linear", OnnxModelConfig(version="1"))
    _assert_answer(_infer(client, x, "/v2/models/linear/versions/1/infer"), x, seed=0,
                   version="1")
    backend.apply("linear", OnnxModelConfig(version="2"))
    _assert_answer(_infer(client, x), x, seed=1, version="2")
    _assert_answer(_infer(client, x, "/v2/models/linear/versions/1/infer"), x, seed=0,
                   version="1")


def test_served_version_change_is_reported_at_once(client: TestClient,
                                                   backend: InProcessModels,
                                                   ingress_config: MutableIngressConfig) -> None:
    # The ingress trusts its status copy for a long time; the answer still names the
    # version that computed it, and the copy is dropped when a result shows a new version.
    ingress_config.value = IngressConfig(status_ttl_s=300)
    x = _rows(3)
    _assert_answer(_infer(client, x), x, seed=1, version="2")
    backend.apply("linear", OnnxModelConfig(version="1"))
    _assert_answer(_infer(client, x), x, seed=0, version="1")
    assert client.get("/v2/models/linear").json()["parameters"]["served_version"] == "1"


def test_nan_output_is_null_in_valid_json(client: TestClient) -> None:
    body = b'{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32",' \
           b'"data":[NaN,1,2,3]}]}'
    response = client.post("/v2/models/nanok/infer", content=body,
                           headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not valid JSON")

    document = json.loads(response.content, parse_constant=refuse)
    assert _output(document, "probabilities")["data"] == [None, None]


# --- binary tensor data extension ---------------------------------------------------------


def _binary_request(x: np.ndarray, *, binary_output: bool = False) -> tuple[bytes, int]:
    header: dict[str, Any] = {"inputs": [{
        "name": "features", "shape": list(x.shape), "datatype": "FP32",
        "parameters": {"binary_data_size": x.nbytes}}]}
    if binary_output:
        header["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": True}}]
    head = json.dumps(header).encode()
    return head + x.astype("<f4").tobytes(), len(head)


def test_binary_request(client: TestClient) -> None:
    x = _rows(3)
    body, json_length = _binary_request(x)
    response = client.post("/v2/models/linear/infer", content=body,
                           headers={"Inference-Header-Content-Length": str(json_length),
                                    "content-type": "application/octet-stream"})
    _assert_answer(response, x, seed=1, version="2")


def test_binary_request_and_binary_output(client: TestClient) -> None:
    x = _rows(2)
    body, json_length = _binary_request(x, binary_output=True)
    response = client.post("/v2/models/linear/infer", content=body,
                           headers={"Inference-Header-Content-Length": str(json_length)})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:length])
    assert head["model_version"] == "2"
    assert head["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [2, 2],
                                "parameters": {"binary_data_size": 16}}]
    values = np.frombuffer(response.content[length:], "<f4").reshape(2, 2)
    np.testing.assert_allclose(values, reference_probabilities(x, 1), atol=ATOL)


def test_tritonclient_request_and_response(client: TestClient) -> None:
    import tritonclient.http as triton

    x = _rows(4)
    tensor = triton.InferInput("features", [4, 4], "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=True),
               triton.InferRequestedOutput("label", binary_data=False)]
    body, json_length = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs, request_id="tc-1")
    response = client.post("/v2/models/linear/infer", content=body,
                           headers={"Inference-Header-Content-Length": str(json_length)})
    assert response.status_code == 200, response.text
    result = triton.InferenceServerClient.parse_response_body(
        response.content, header_length=int(response.headers["inference-header-content-length"]))
    expected = reference_probabilities(x, 1)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=ATOL)
    np.testing.assert_array_equal(result.as_numpy("label"), expected.argmax(axis=1))
    assert result.get_response()["id"] == "tc-1"


def test_binary_header_errors(client: TestClient) -> None:
    x = _rows(1)
    body, json_length = _binary_request(x)
    _assert_error(client.post("/v2/models/linear/infer", content=body,
                              headers={"Inference-Header-Content-Length": "abc"}),
                  400, "inference-header-content-length")
    _assert_error(client.post("/v2/models/linear/infer", content=body,
                              headers={"Inference-Header-Content-Length": str(len(body) + 1)}),
                  400, "outside the body")
    # Without the header the body is not JSON.
    _assert_error(client.post("/v2/models/linear/infer", content=body), 400, "not valid JSON")
    _assert_error(client.post("/v2/models/linear/infer", content=body[:-4],
                              headers={"Inference-Header-Content-Length": str(json_length)}),
                  400, "'features'", "runs past")
    _assert_still_good(client)


# --- errors ---------------------------------------------------------------------------------


def test_unknown_model(client: TestClient) -> None:
    _assert_error(_infer(client, _rows(1), "/v2/models/nope/infer"), 404, "'nope'")
    _assert_still_good(client)


def test_unknown_version(client: TestClient) -> None:
    _assert_error(_infer(client, _rows(1), "/v2/models/linear/versions/9/infer"), 404, "'9'")
    _assert_still_good(client)


@pytest.mark.parametrize(
    ("body", "parts"),
    [
        (b"{not json", ["not valid JSON"]),
        (b"", ["not valid JSON"]),
        (b"[]", ["JSON object"]),
        (b'{"inputs": []}', ["inputs"]),
        (b'{"id": 1}', ["inputs"]),
    ],
    ids=["malformed", "empty", "array", "empty-inputs", "no-inputs"],
)
def test_malformed_body(client: TestClient, body: bytes, parts: list[str]) -> None:
    response = client.post("/v2/models/linear/infer", content=body,
                           headers={"content-type": "application/json"})
    _assert_error(response, 400, *parts)
    _assert_still_good(client)


@pytest.mark.parametrize(
    ("item", "parts"),
    [
        ({"shape": [2, 3], "datatype": "FP32", "data": [0] * 6}, ["'features'", "[2, 3]"]),
        ({"shape": [8], "datatype": "FP32", "data": [0] * 8}, ["'features'", "[8]"]),
        ({"shape": [1, 4], "datatype": "FP64", "data": [0] * 4}, ["'features'", "FP64"]),
        ({"shape": [2, 4], "datatype": "FP32", "data": [0] * 4}, ["'features'", "4 elements"]),
        ({"shape": [1, 4], "datatype": "FP32", "data": ["a"] * 4}, ["'features'", "numbers"]),
        ({"shape": [1, 4], "datatype": "FP32", "data": [0, 1e40, 0, 0]},
         ["'features'", "outside the range"]),
        ({"shape": [0, 4], "datatype": "FP32", "data": []}, ["'features'", "0"]),
    ],
    ids=["columns", "rank", "datatype", "length", "strings", "overflow", "zero-batch"],
)
def test_bad_input(client: TestClient, item: dict[str, Any], parts: list[str]) -> None:
    response = client.post("/v2/models/linear/infer",
                           json={"inputs": [{"name": "features", **item}]})
    _assert_error(response, 400, *parts)
    _assert_still_good(client)


def test_unknown_and_missing_inputs(client: TestClient) -> None:
    body = {"inputs": [{"name": "feature", "shape": [1, 4], "datatype": "FP32",
                        "data": [0] * 4}]}
    _assert_error(client.post("/v2/models/linear/infer", json=body), 400, "'feature'")
    _assert_error(client.post("/v2/models/linear/infer",
                              json={"inputs": [*_payload(_rows(1))["inputs"]] * 2}),
                  400, "'features'", "twice")
    _assert_still_good(client)


def test_unknown_output(client: TestClient) -> None:
    _assert_error(_infer(client, _rows(1), outputs=[{"name": "logits"}]), 400, "'logits'")
    _assert_still_good(client)


def test_fixed_batch_refuses_two_rows(client: TestClient) -> None:
    _assert_error(_infer(client, _rows(2), "/v2/models/fixed/infer"), 400, "'features'",
                  "[2, 4]")
    one = _rows(1)
    _assert_answer(_infer(client, one, "/v2/models/fixed/infer"), one, seed=3, version="1",
                   model="fixed")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_is_refused(client: TestClient, literal: str) -> None:
    body = '{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[0,%s,0,0]}]}'
    response = client.post("/v2/models/linear/infer", content=(body % literal).encode(),
                           headers={"content-type": "application/json"})
    _assert_error(response, 400, "'features'", "NaN")
    _assert_still_good(client)


def test_body_over_the_limit_with_content_length(client: TestClient,
                                                 ingress_config: MutableIngressConfig) -> None:
    ingress_config.value = IngressConfig(max_body_bytes=1024)
    big = _rows(64)
    body = json.dumps(_payload(big)).encode()
    assert len(body) > 1024
    response = client.post("/v2/models/linear/infer", content=body,
                           headers={"content-type": "application/json"})
    _assert_error(response, 413, str(len(body)), "1024")
    _assert_still_good(client)
    # A body just within the limit is still served.
    small = _rows(2)
    assert len(json.dumps(_payload(small))) <= 1024
    _assert_answer(_infer(client, small), small, seed=1, version="2")


def test_body_over_the_limit_streamed(client: TestClient,
                                      ingress_config: MutableIngressConfig) -> None:
    ingress_config.value = IngressConfig(max_body_bytes=1024)
    body = json.dumps(_payload(_rows(64))).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 256):
            yield body[start:start + 256]

    response = client.post("/v2/models/linear/infer", content=chunks(),
                           headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    _assert_error(response, 413, "over the limit of 1024")
    _assert_still_good(client)


def test_streamed_body_within_the_limit(client: TestClient) -> None:
    x = _rows(6)
    body = json.dumps(_payload(x)).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 100):
            yield body[start:start + 100]

    response = client.post("/v2/models/linear/infer", content=chunks(),
                           headers={"content-type": "application/json"})
    _assert_answer(response, x, seed=1, version="2")


def test_deeply_nested_body_is_a_client_error(client: TestClient) -> None:
    # Nesting beyond the JSON decoder's recursion limit is malformed input: 400, not 500.
    body = b"[" * 10_000 + b"]" * 10_000
    response = client.post("/v2/models/linear/infer", content=body,
                           headers={"content-type": "application/json"})
    _assert_error(response, 400, "JSON")
    _assert_still_good(client)


def test_unknown_route_is_json_404(client: TestClient) -> None:
    _assert_error(client.get("/v2/nothing/here"), 404, "Not Found")
    _assert_error(client.get("/"), 404)
    _assert_still_good(client)


def test_wrong_method_is_json_405(client: TestClient) -> None:
    _assert_error(client.get("/v2/models/linear/infer"), 405)
    _assert_error(client.post("/v2/health/live"), 405)


def test_openapi_lists_the_routes(client: TestClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    expected = {
        "/v2": "get",
        "/v2/health/live": "get",
        "/v2/health/ready": "get",
        "/v2/models/{name}": "get",
        "/v2/models/{name}/versions/{version}": "get",
        "/v2/models/{name}/ready": "get",
        "/v2/models/{name}/versions/{version}/ready": "get",
        "/v2/models/{name}/infer": "post",
        "/v2/models/{name}/versions/{version}/infer": "post",
    }
    for path, method in expected.items():
        assert path in paths, sorted(paths)
        assert method in paths[path], paths[path]


# --- faults of the model side: the answer is a clear 5xx, never a hang or a bare 500 -------


class _SlowModels(InProcessModels):
    """Real models behind a slow link: every inference waits ``delay_s`` first."""

    delay_s = 0.5

    async def infer_many(self, name: str, calls: list[Any]) -> Any:
        import asyncio

        await asyncio.sleep(self.delay_s)
        return await super().infer_many(name, calls)


class _UnreachableModels(InProcessModels):
    """The model deployments do not answer (what HandleBackend maps Ray's errors to)."""

    def __init__(self, repository: Any, error: Exception) -> None:
        super().__init__(repository)
        self.error = error

    async def status(self, name: str) -> Any:
        raise self.error

    async def infer_many(self, name: str, calls: list[Any]) -> Any:
        raise self.error


def _body(n: int = 1) -> dict[str, Any]:
    x = np.zeros((n, 4), dtype=np.float32)
    return {"inputs": [{"name": "features", "shape": [n, 4], "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}


def test_model_slower_than_the_timeout_is_504(repository: Any) -> None:
    from deployments.ingress.rest.app import create_app

    config = MutableIngressConfig(IngressConfig(request_timeout_s=0.05))
    with TestClient(create_app(_SlowModels(repository), config)) as c:
        answer = c.post("/v2/models/linear/infer", json=_body())
        assert answer.status_code == 504, answer.text
        assert answer.json()["stage"] == "model"  # which step of the request ran out of time
        assert "'linear'" in answer.json()["error"] and "0.05" in answer.json()["error"]
        config.value = IngressConfig(request_timeout_s=5)
        assert c.post("/v2/models/linear/infer", json=_body()).status_code == 200


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        ("overloaded", 503, "1"),
        ("unavailable", 503, "1"),
    ],
)
def test_unreachable_or_overloaded_model_is_503_with_retry_after(
        repository: Any, error: str, status: int, retry_after: str) -> None:
    from deployments.errors import DependencyUnavailable, Overloaded
    from deployments.ingress.rest.app import create_app

    exc = (Overloaded("model 'linear' is overloaded; retry shortly") if error == "overloaded"
           else DependencyUnavailable("model 'linear' is unavailable", retry_after_s=1))
    backend = _UnreachableModels(repository, exc)
    with TestClient(create_app(backend, MutableIngressConfig())) as c:
        response = c.post("/v2/models/linear/infer", json=_body())
        _assert_error(response, status, "'linear'")
        assert response.headers["retry-after"] == retry_after
        ready = c.get("/v2/health/ready")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False
        assert "linear" in ready.json()["models"]
        model_ready = c.get("/v2/models/linear/ready")
        assert model_ready.status_code == 503 and model_ready.json()["ready"] is False


# --- the hot routes (fastpath.py) answer exactly as the FastAPI routes do ------------------


class _Routes:
    """Records the route template and model of every answered request (as metrics do)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int]] = []

    def request(self, http_route: str, model: str, status: int, latency_ms: float,
                version: str = "") -> None:
        self.seen.append((http_route, model, status))


@pytest.mark.parametrize(("path", "body", "headers"), [
    ("/v2/models/linear/infer", _body(2), {}),
    ("/v2/models/linear/versions/1/infer", _body(1), {}),
    ("/v2/models/linear/infer", {"inputs": [{"name": "features", "shape": [1, 3],
                                             "datatype": "FP32", "data": [1, 2, 3]}]}, {}),
    ("/v2/models/nope/infer", _body(1), {}),
    ("/v2/models/linear/versions/9/infer", _body(1), {}),
    ("/v2/models/linear/infer", _body(1), {"content-type": "text/plain"}),
    ("/v2/models/linear/infer", _body(1), {"content-encoding": "gzip"}),
    ("/v1/decide", {"model": "linear", "entities": []}, {}),
    ("/v1/decide", {"model": "linear", "entities": [{"symbol": "S"}]}, {}),
])
def test_the_hot_routes_answer_as_the_fastapi_routes(repository: Any, path: str,
                                                     body: dict[str, Any],
                                                     headers: dict[str, str]) -> None:
    """With API keys off, infer and decide skip FastAPI's routing (fastpath.HotRoutes);
    with them on, the FastAPI routes answer. Same status, same body, same route in metrics."""
    from deployments.ingress.auth import ApiKey, AuthConfig, hash_key
    from deployments.ingress.rest.app import build_plane, create_rest_app
    from deployments.ingress.rest.hot_routes import HotRoutes

    key = "k-fastpath-0123456789abcdef-secret"
    answers = []
    for auth in (AuthConfig(), AuthConfig(enabled=True,
                                          keys=(ApiKey(name="t", sha256=hash_key(key)),))):
        observer = _Routes()
        config = MutableIngressConfig(IngressConfig(max_body_bytes=4096))
        plane = build_plane(InProcessModels(repository), config)
        app = create_rest_app(plane, observer=observer, auth=auth)
        hot = [m for m in app.user_middleware if m.cls is HotRoutes]
        assert len(hot) == (0 if auth.enabled else 1)
        with TestClient(app, raise_server_exceptions=False) as c:
            response = c.post(path, content=json.dumps(body).encode(),
                              headers={"content-type": "application/json", **headers,
                                       "authorization": f"Bearer {key}"})
        answers.append((response.status_code, response.json(), observer.seen))
    fast, routed = answers
    assert fast == routed
    assert fast[2][0][0] in ("/v2/models/{name}/infer", "/v1/decide",
                             "/v2/models/{name}/versions/{version}/infer")


class SlowModels(InProcessModels):
    """The in-process models, each batch held for ``delay_s`` first."""

    def __init__(self, backend: InProcessModels, delay_s: float) -> None:
        self.__dict__.update(backend.__dict__)
        self.delay_s = delay_s

    async def infer_many(self, name: str, calls: list[Any]) -> Any:
        await asyncio.sleep(self.delay_s)
        return await super().infer_many(name, calls)


async def test_past_max_requests_the_ingress_answers_json_503_at_once(
        backend: InProcessModels) -> None:
    """Keel's own admission limit: the requests over ``max_requests`` get Keel's JSON 503
    with Retry-After at once (no model call), the admitted ones are answered, and the
    probes and metadata still answer while the replica is full."""
    config = MutableIngressConfig(IngressConfig(max_requests=2))
    slow = SlowModels(backend, delay_s=0.5)
    app = create_app(slow, config)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keel") as client:
        x = _rows(1)

        async def infer() -> httpx.Response:
            return await client.post("/v2/models/linear/infer", json=_payload(x))

        async def decide() -> httpx.Response:
            return await client.post("/v1/decide", json={"model": "linear", "entities": []})

        running = [asyncio.create_task(infer()) for _ in range(2)]
        await asyncio.sleep(0.1)  # both admitted, waiting for the model
        turned_away = await asyncio.gather(infer(), infer(), decide())
        live = await client.get("/v2/health/live")
        metadata = await client.get("/v2/models/linear")
        answered = await asyncio.gather(*running)
        later = await infer()  # places free again
    for response in turned_away:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.headers["content-type"] == "application/json"
        assert "max_requests" in response.json()["error"]
    assert live.status_code == 200 and metadata.status_code == 200
    assert [r.status_code for r in answered] == [200, 200]
    assert later.status_code == 200
