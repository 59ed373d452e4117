"""Hostile input to the ingress app in process (real ONNX models, a real LLM gateway core):
media types, compressed bodies, deep nesting, odd names, path traversal, impossible
shapes. Each gets a 4xx whose message names the field, never a 500.

tests/serve/test_bad_input.py sends the same kinds of request through HAProxy and Serve.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deployments.contracts import InferenceRequest
from deployments.errors import InvalidInput, ModelNotFound, quoted
from deployments.ingress.dataplane.codec import MAX_RANK, decode_inputs, parse_request
from deployments.ingress.rest.app import IngressConfig, create_app
from deployments.llm.config import LLMGatewayConfig
from deployments.llm.gateway import ChatGateway
from deployments.repository import ModelRepository, ModelSpec, TensorSpec
from tests.support.inprocess import InProcessLLM, InProcessModels

GOOD = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                    "data": [0.1, 0.2, 0.3, 0.4]}]}
CHAT = {"model": "pub", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


@pytest.fixture
def app_client(backend: InProcessModels) -> Iterator[TestClient]:
    """The ingress with the LLM routes on a real gateway core whose upstream is closed:
    every case here is refused before any upstream call."""
    gateway = ChatGateway(None, LLMGatewayConfig.model_validate({
        "upstreams": [{"name": "fake", "base_url": "http://127.0.0.1:1/v1",
                       "models": {"pub": "up-model"}, "timeout_s": 1.0}]}))
    app = create_app(backend, IngressConfig, llm=InProcessLLM(gateway))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def error(response: Any, status: int, *parts: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for part in parts:
        assert part in message, message
    return str(message)


def still_good(client: TestClient) -> None:
    answer = client.post("/v2/models/linear/infer", json=GOOD)
    assert answer.status_code == 200, answer.text


# --- media types and encodings ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type", "named"),
    [("/v2/models/linear/infer", "text/plain", "'text/plain'"),
     ("/v2/models/linear/infer", "application/xml", "'application/xml'"),
     ("/v2/models/linear/infer", "multipart/form-data; boundary=b", "'multipart/form-data'"),
     ("/v2/models/linear/infer", "application/x-www-form-urlencoded",
      "'application/x-www-form-urlencoded'"),
     ("/v2/models/linear/versions/1/infer", "text/csv", "'text/csv'"),
     ("/v1/decide", "application/octet-stream", "'application/octet-stream'"),
     ("/v1/decide", "text/plain; charset=utf-8", "'text/plain'"),
     ("/v1/chat/completions", "application/xml", "'application/xml'"),
     ("/v1/chat/completions", "application/octet-stream", "'application/octet-stream'")],
)
def test_unsupported_content_type_is_415_naming_it(app_client: TestClient, path: str,
                                                  content_type: str, named: str) -> None:
    body = json.dumps(CHAT if "chat" in path else GOOD).encode()
    message = error(app_client.post(path, content=body, headers={"content-type": content_type}),
                    415, named)
    assert "application/json" in message  # and says what to send instead
    still_good(app_client)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/octet-stream", None])
def test_json_and_binary_extension_media_types_are_served(app_client: TestClient,
                                                          content_type: str | None) -> None:
    # tritonclient's aio client sends application/octet-stream for every body (JSON-only
    # included), its sync client no Content-Type at all: both must keep working.
    headers = {"content-type": content_type} if content_type else {}
    answer = app_client.post("/v2/models/linear/infer", content=json.dumps(GOOD).encode(),
                             headers=headers)
    assert answer.status_code == 200, answer.text


def test_binary_extension_as_octet_stream(app_client: TestClient) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
    head = json.dumps({"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    answer = app_client.post("/v2/models/linear/infer", content=head + x.tobytes(),
                             headers={"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(head))})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["shape"] == [2, 2]


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("br", lambda b: b),
     ("GZIP", gzip.compress), ("gzip, identity", gzip.compress)],
)
def test_compressed_body_is_415_naming_the_encoding(app_client: TestClient, encoding: str,
                                                   compress: Any) -> None:
    # A few kB of gzip inflate to gigabytes: a compressed body is refused before a byte
    # of it is read, never inflated.
    bomb = compress(b"[" + b"0," * 4_000_000 + b"0]")
    for path in ("/v2/models/linear/infer", "/v1/decide", "/v1/chat/completions"):
        error(app_client.post(path, content=bomb,
                              headers={"content-type": "application/json",
                                       "content-encoding": encoding}),
              415, repr(encoding.lower()))
    still_good(app_client)


def test_identity_encoding_is_accepted(app_client: TestClient) -> None:
    answer = app_client.post("/v2/models/linear/infer", json=GOOD,
                             headers={"content-encoding": "identity"})
    assert answer.status_code == 200, answer.text


# --- deep nesting -------------------------------------------------------------------------

DEEP = 100_000


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v2/models/linear/infer",
      b'{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":'
      + b"[" * DEEP + b"]" * DEEP + b"}]}"),
     ("/v2/models/linear/infer",
      b'{"parameters":' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b',"inputs":[]}'),
     ("/v1/decide", b'{"model":"linear","entities":' + b"[" * DEEP + b"]" * DEEP + b"}"),
     ("/v1/decide", b'{"model":"linear","entities":[' + b'{"a":' * DEEP + b"1"
      + b"}" * DEEP + b"]}"),
     ("/v1/chat/completions", b'{"model":"pub","messages":' + b"[" * DEEP + b"]" * DEEP
      + b"}"),
     ("/v1/chat/completions", b"[" * DEEP + b"]" * DEEP)],
    ids=["infer-data", "infer-parameters", "decide-entities", "decide-entity-objects",
         "chat-messages", "chat-body"],
)
def test_deeply_nested_json_is_400(app_client: TestClient, path: str, body: bytes) -> None:
    error(app_client.post(path, content=body, headers={"content-type": "application/json"}),
          400, "JSON")
    still_good(app_client)


@pytest.mark.parametrize("depth", [70, 500, 900])
def test_data_nested_within_the_decoder_limit_is_400(app_client: TestClient,
                                                     depth: int) -> None:
    body = (b'{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":'
            + b"[" * depth + b"1" + b"]" * depth + b"}]}")
    error(app_client.post("/v2/models/linear/infer", content=body,
                          headers={"content-type": "application/json"}), 400, "'features'")


def test_deep_bytes_data_is_refused_without_recursion() -> None:
    # Nested just below json's own limit: a recursive walk would overflow the stack here.
    spec = ModelSpec(name="s", version="1",
                     inputs=[TensorSpec(name="s", datatype="BYTES", shape=[-1])],
                     outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])])
    depth = 900
    body = (b'{"inputs":[{"name":"s","shape":[1],"datatype":"BYTES","data":'
            + b"[" * depth + b'"x"' + b"]" * depth + b"}]}")
    request, tail = parse_request(body)
    with pytest.raises(InvalidInput, match=rf"'s'.*nested more than {MAX_RANK}"):
        decode_inputs(request, spec, tail)
    # Nesting within numpy's rank limit still decodes (and is then checked against the shape).
    shallow = InferenceRequest.model_validate(
        {"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "data": [[["x"]]]}]})
    assert decode_inputs(shallow, spec)["s"].tolist() == [b"x"]


# --- odd names ----------------------------------------------------------------------------

ODD_NAMES = ["a\x00b", "\u202eevil", "😀", "e\u0301", "\u00e9", "x" * 5000, " ", "linear\n"]


@pytest.mark.parametrize("name", ODD_NAMES,
                         ids=["nul", "rtl", "emoji", "non-nfc", "nfc", "5000", "space", "nl"])
def test_odd_model_names_are_404_named_safely(app_client: TestClient, name: str) -> None:
    path = quote(name, safe="")
    for response in (app_client.get(f"/v2/models/{path}"),
                     app_client.get(f"/v2/models/{path}/ready"),
                     app_client.get(f"/v2/models/{path}/versions/1"),
                     app_client.post(f"/v2/models/{path}/infer", json=GOOD),
                     app_client.post("/v1/decide", json={"model": name,
                                                          "entities": [{"symbol": "S"}]})):
        message = error(response, 404, quoted(name))
        assert "\u202e" not in message and "\x00" not in message and "\n" not in message
        assert len(message) < 400
    still_good(app_client)


def test_quoted_escapes_and_bounds() -> None:
    assert quoted("a\x00b") == r"'a\x00b'"
    assert quoted("\u202eevil") == r"'\u202eevil'"
    assert quoted("😀") == "'😀'"
    assert quoted("x" * 5000).endswith("... (5000 characters)")
    assert len(quoted("x" * 5000)) < 120
    assert len(quoted(["y" * 1000])) < 200


@pytest.mark.parametrize("version", ["a\x00", "\u202e1", "😀", "9" * 5000, "1\u0301"])
def test_odd_versions_are_404_named_safely(app_client: TestClient, version: str) -> None:
    path = quote(version, safe="")
    for response in (app_client.get(f"/v2/models/linear/versions/{path}"),
                     app_client.get(f"/v2/models/linear/versions/{path}/ready"),
                     app_client.post(f"/v2/models/linear/versions/{path}/infer", json=GOOD),
                     app_client.post("/v1/decide", json={"model": "linear", "version": version,
                                                          "entities": [{"symbol": "S"}]})):
        message = error(response, 404, quoted(version))
        assert "\u202e" not in message and len(message) < 400


# --- path traversal -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/v2/models/..%2F..%2Fetc%2Fpasswd", "/v2/models/%2e%2e",
     "/v2/models/linear/versions/..%2F2", "/v2/models/linear/versions/%2e%2e",
     "/v2/models/linear/versions/%2Fetc%2Fpasswd", "/v2/models/linear/versions/..%2F..%2F..",
     "/v2/models/%2Ftmp/versions/1",
     "/v2/models/linear/versions/%252e%252e%252f1"],
)
def test_path_traversal_in_the_path_is_404(app_client: TestClient, path: str,
                                           model_root: Path) -> None:
    secret = model_root.parent / "outside.txt"
    secret.write_text("SECRET")
    for response in (app_client.get(path), app_client.get(f"{path}/ready"),
                     app_client.post(f"{path}/infer", json=GOOD)):
        assert response.status_code == 404, (path, response.text)
        assert "SECRET" not in response.text
        assert response.json()["error"]
    still_good(app_client)


@pytest.mark.parametrize(("model", "version"),
                         [("../linear", None), ("/etc/passwd", None), ("linear/..", None),
                          ("linear", "../1"), ("linear", "/1"), ("linear", ".."),
                          ("linear", "1/../2"), ("linear", "%2e%2e")])
def test_path_traversal_in_decide_is_404_naming_it(app_client: TestClient, model: str,
                                                   version: str | None) -> None:
    body: dict[str, Any] = {"model": model, "entities": [{"symbol": "S"}]}
    if version is not None:
        body["version"] = version
    error(app_client.post("/v1/decide", json=body), 404,
          repr(version if version is not None else model))


@pytest.mark.parametrize("value", ["..", "../1", "/1", "1/../2", ".", "-1", "_x", "a b",
                                   "1\x00", "x" * 200, "1\\..\\2", "C:\\1"])
def test_repository_refuses_unsafe_names_and_versions(repository: ModelRepository,
                                                      value: str) -> None:
    # The repository is the only place a name or version becomes a path: anything but
    # [A-Za-z0-9][A-Za-z0-9_.-]{0,127} is refused before the filesystem is touched.
    with pytest.raises(ModelNotFound):
        repository.spec("linear", value)
    with pytest.raises(ModelNotFound):
        repository.model_path("linear", value)
    with pytest.raises(ModelNotFound):
        repository.versions(value)


# --- impossible shapes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "parts"),
    [([1_000_000_000, 1_000_000_000], ["does not match"]),
     ([10**30, 4], ["[1" + "0" * 30 + ", 4]", "needs"]),
     ([2**63, 4], ["needs"]),
     ([2**64 + 1, 4], ["needs"]),
     ([-1, 4], ["negative"]),
     ([1, -4], ["negative"]),
     ([-(2**63), 4], ["negative"]),
     ([3, 4], ["[3, 4]", "needs"]),
     ([1_000_000_000, 4], ["[1000000000, 4]", "needs"]),
     ([1] * 100_000, ["100000 dimensions"])],
    ids=["1e9x1e9", "1e30", "int64-max+1", "uint64-max+2", "negative-batch", "negative-dim",
         "int64-min", "mismatch", "1e9-rows", "rank-100k"],
)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_impossible_shapes_are_400_before_any_allocation(app_client: TestClient,
                                                         shape: list[int], parts: list[str],
                                                         binary: bool) -> None:
    item: dict[str, Any] = {"name": "features", "shape": shape, "datatype": "FP32"}
    if binary:
        item["parameters"] = {"binary_data_size": 16}
        head = json.dumps({"inputs": [item]}).encode()
        response = app_client.post("/v2/models/linear/infer", content=head + bytes(16),
                                   headers={"inference-header-content-length": str(len(head))})
    else:
        item["data"] = [0.0] * 4
        response = app_client.post("/v2/models/linear/infer", json={"inputs": [item]})
    message = error(response, 400, "'features'", *parts)
    assert len(message) < 400
    still_good(app_client)


def test_shape_as_a_float_or_a_huge_literal_is_400(app_client: TestClient) -> None:
    for literal in (b"1e9", b"1.0", b"1.5", b"9" * 5000, b'"1"', b"true", b"null"):
        body = (b'{"inputs":[{"name":"features","shape":[' + literal
                + b',4],"datatype":"FP32","data":[0,0,0,0]}]}')
        answer = app_client.post("/v2/models/linear/infer", content=body,
                                 headers={"content-type": "application/json"})
        assert answer.status_code == 400, (literal[:20], answer.text)
        assert "inputs.0.shape" in answer.json()["error"] or "JSON" in answer.json()["error"]


def test_negative_content_length_is_400(app_client: TestClient) -> None:
    error(app_client.post("/v2/models/linear/infer", content=b"",
                          headers={"content-length": "-5"}), 400, "content-length")


# --- the OpenAPI document says what the routes read and answer ---------------------------


def test_openapi_documents_hand_read_bodies_and_keel_errors(app_client: TestClient) -> None:
    document = app_client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert {"InferenceRequest", "RequestInput", "ChatRequest", "ErrorBody"} <= set(schemas)
    assert "HTTPValidationError" not in schemas  # Keel never answers FastAPI's 422
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json",
                                                     "application/octet-stream"}
    assert infer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferenceRequest"}
    assert "Inference-Header-Content-Length" in {p["name"] for p in infer["parameters"]}
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatRequest"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            assert "422" not in answers, (method, path)
            if method == "post":
                assert {"400", "413", "415"} <= set(answers), (method, path)
            if "{name}" in path:
                assert "404" in answers, (method, path)
    assert "401" not in document["paths"]["/v2/health/live"]["get"]["responses"]
    assert "401" in document["paths"]["/v1/decide"]["post"]["responses"]
