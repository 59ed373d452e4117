"""Hostile input through the real front door: HAProxy, Ray Serve and the ingress replica.

Where the proxy answers (oversized headers, paths it normalises) the answer must still
be a 4xx and never a 5xx or a hang; where Keel answers, the status and the message are
the ones the unit tests pin down in process (tests/unit/test_bad_input.py). Requests go
over a raw socket so that nothing on the client side rewrites the path or the headers.
"""

from __future__ import annotations

import gzip
import json
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.serve_app import KeelApp

pytestmark = pytest.mark.slow

GOOD = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                    "data": [0.1, 0.2, 0.3, 0.4]}]}


def raw(keel_app: KeelApp, request: bytes, timeout_s: float = 30) -> tuple[int, bytes]:
    """Send ``request`` as is; the status and body of the answer (connection closed)."""
    url = urlsplit(keel_app.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=timeout_s) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break  # an answer already read stands; a missing one fails below
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1."), data[:200]
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return status, body


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, body = out + rest[:size], rest[size + 2:]
    return out


def get(path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error_of(body: bytes) -> str:
    document: dict[str, Any] = json.loads(body)
    return str(document["error"])


def assert_still_serving(keel_app: KeelApp) -> None:
    answer = httpx.post(f"{keel_app.base_url}/v2/models/linear/infer", json=GOOD, timeout=30)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    "headers",
    [{"X-Big": "a" * 70_000}, {f"X-Many-{i}": "v" * 100 for i in range(300)},
     {"Cookie": "c=" + "b" * 200_000}],
    ids=["one-70kB-header", "300-headers", "200kB-cookie"],
)
def test_oversized_headers_are_a_4xx_from_the_proxy(keel_app: KeelApp,
                                                    headers: dict[str, str]) -> None:
    status, _ = raw(keel_app, post("/v2/models/linear/infer", json.dumps(GOOD).encode(),
                                   {"Content-Type": "application/json", **headers}))
    # HAProxy answers 400 itself (its request buffer is 16 kB); the Python proxy 431/400.
    assert status in (400, 431), status
    assert_still_serving(keel_app)


def test_headers_within_the_proxy_limits_are_served(keel_app: KeelApp) -> None:
    status, body = raw(keel_app, post("/v2/models/linear/infer", json.dumps(GOOD).encode(),
                                      {"Content-Type": "application/json",
                                       "X-Padding": "p" * 4000}))
    assert status == 200, body


@pytest.mark.parametrize(
    ("path", "content_type", "named"),
    [("/v2/models/linear/infer", "text/plain", "'text/plain'"),
     ("/v2/models/linear/infer", "application/xml", "'application/xml'"),
     ("/v2/models/linear/infer", "multipart/form-data; boundary=x", "'multipart/form-data'"),
     ("/v1/decide", "application/octet-stream", "'application/octet-stream'"),
     ("/v1/decide", "application/x-www-form-urlencoded", "form-urlencoded"),
     ("/v1/chat/completions", "text/plain", "'text/plain'")],
)
def test_unsupported_content_type_is_415_naming_it(keel_app: KeelApp, path: str,
                                                  content_type: str, named: str) -> None:
    status, body = raw(keel_app, post(path, json.dumps(GOOD).encode(),
                                      {"Content-Type": content_type}))
    assert status == 415, body
    assert named in error_of(body)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "application/octet-stream", None])
def test_json_and_the_binary_extension_media_types_are_served(keel_app: KeelApp,
                                                              content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    status, body = raw(keel_app, post("/v2/models/linear/infer", json.dumps(GOOD).encode(),
                                      headers))
    assert status == 200, body
    assert json.loads(body)["model_name"] == "linear"


def test_gzip_body_is_415_and_never_inflated(keel_app: KeelApp) -> None:
    # 8 MiB of zeros compress to ~8 kB: inflated, it would pass the size limit's check.
    bomb = gzip.compress(b"0" * (8 * 1024 * 1024))
    for path in ("/v2/models/linear/infer", "/v1/decide"):
        status, body = raw(keel_app, post(path, bomb, {"Content-Type": "application/json",
                                                       "Content-Encoding": "gzip"}))
        assert status == 415, body
        assert "'gzip'" in error_of(body)
    assert_still_serving(keel_app)


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v2/models/linear/infer",
      b'{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":'
      + b"[" * 100_000 + b"]" * 100_000 + b"}]}"),
     ("/v1/decide", b'{"model":"risk_mlp","entities":' + b"[" * 100_000 + b"]" * 100_000
      + b"}"),
     ("/v1/decide", b'{"model":"risk_mlp","entities":[{"symbol":' + b"[" * 150
      + b"]" * 150 + b',"account_id":"ACC0001"}]}'),
     ("/v1/chat/completions", b'{"model":"qwen2.5-1.5b","messages":'
      + b"[" * 100_000 + b"]" * 100_000 + b"}")],
    ids=["infer-data", "decide-entities", "decide-entity-value", "chat-messages"],
)
def test_deeply_nested_json_is_400(keel_app: KeelApp, path: str, body: bytes) -> None:
    status, answer = raw(keel_app, post(path, body, {"Content-Type": "application/json"}))
    assert status == 400, answer
    assert error_of(answer)
    assert_still_serving(keel_app)


@pytest.mark.parametrize(
    ("name", "shown"),
    [("a%00b", r"'a\x00b'"), ("%E2%80%AEevil", r"'\u202eevil'"), ("%F0%9F%98%80", "'😀'"),
     ("e%CC%81", "'e\u0301'"), ("x" * 5000, "(5000 characters)")],
    ids=["nul", "rtl-override", "emoji", "non-nfc", "5000-chars"],
)
def test_odd_model_names_are_404_named_safely(keel_app: KeelApp, name: str,
                                              shown: str) -> None:
    for request in (get(f"/v2/models/{name}"), get(f"/v2/models/{name}/ready"),
                    post(f"/v2/models/{name}/infer", json.dumps(GOOD).encode(),
                         {"Content-Type": "application/json"})):
        status, body = raw(keel_app, request)
        assert status in (400, 404), body
        if status == 404:
            message = error_of(body)
            assert shown in message, message
            assert "\u202e" not in message and len(message) < 500


@pytest.mark.parametrize(
    ("entity", "shown"),
    [({"symbol": "SYM\u0000001", "account_id": "ACC0001"}, r"'SYM\x00001'"),
     ({"symbol": "\u202eSYM001", "account_id": "ACC0001"}, r"'\u202eSYM001'"),
     ({"symbol": "SYM😀", "account_id": "ACC0001"}, "'SYM😀'"),
     ({"symbol": "SYM001", "account_id": "A" * 10_000}, "(10000 characters)")],
    ids=["nul", "rtl-override", "emoji", "10k-chars"],
)
def test_odd_entity_ids_are_404_named_safely(keel_app: KeelApp, entity: dict[str, str],
                                             shown: str) -> None:
    answer = httpx.post(f"{keel_app.base_url}/v1/decide",
                        json={"model": "risk_mlp", "entities": [entity]}, timeout=30)
    assert answer.status_code == 404, answer.text
    message = answer.json()["error"]
    assert shown in message, message
    assert "\u202e" not in message and len(message) < 500


@pytest.mark.parametrize(
    "path",
    ["/v2/models/..%2F..%2Fetc%2Fpasswd", "/v2/models/%2e%2e/ready",
     "/v2/models/linear/versions/..%2F2", "/v2/models/linear/versions/%2e%2e/ready",
     "/v2/models/linear/versions/%2Fetc%2Fpasswd", "/v2/models/linear/versions/..%2F..%2F..",
     "/v2/models/linear/../../../etc/passwd", "/v2/models/linear/versions/1/../../2/ready",
     "/v2/models/linear/versions/%252e%252e%252f1"],
)
def test_path_traversal_in_names_and_versions_is_404(keel_app: KeelApp, path: str) -> None:
    status, body = raw(keel_app, get(path))
    assert status in (400, 404), (status, body)
    assert b"root:" not in body
    status, body = raw(keel_app, post(f"{path}/infer", json.dumps(GOOD).encode(),
                                      {"Content-Type": "application/json"}))
    assert status in (400, 404, 405), (status, body)


@pytest.mark.parametrize(("model", "version"), [("../linear", None), ("/etc/passwd", None),
                                                ("linear", "../1"), ("linear", "/1"),
                                                ("linear", "..")])
def test_path_traversal_in_decide_is_404(keel_app: KeelApp, model: str,
                                         version: str | None) -> None:
    body: dict[str, Any] = {"model": model, "entities": [{"symbol": "SYM001",
                                                          "account_id": "ACC0001"}]}
    if version is not None:
        body["version"] = version
    answer = httpx.post(f"{keel_app.base_url}/v1/decide", json=body, timeout=30)
    assert answer.status_code == 404, answer.text
    assert repr(version if version is not None else model) in answer.json()["error"]


@pytest.mark.parametrize(
    ("shape", "binary"),
    [([1_000_000_000, 1_000_000_000], False), ([10**30, 4], False), ([2**63, 4], True),
     ([-1, 4], False), ([1, -4], True), ([3, 4], False), ([1_000_000_000, 4], True)],
)
def test_impossible_shapes_are_400_naming_the_input(keel_app: KeelApp, shape: list[int],
                                                    binary: bool) -> None:
    item: dict[str, Any] = {"name": "features", "shape": shape, "datatype": "FP32"}
    if binary:
        item["parameters"] = {"binary_data_size": 16}
        head = json.dumps({"inputs": [item]}).encode()
        request = post("/v2/models/linear/infer", head + bytes(16),
                       {"Inference-Header-Content-Length": str(len(head))})
    else:
        item["data"] = [0.0] * 4
        request = post("/v2/models/linear/infer", json.dumps({"inputs": [item]}).encode(),
                       {"Content-Type": "application/json"})
    status, body = raw(keel_app, request)
    assert status == 400, body
    assert "'features'" in error_of(body)
    assert_still_serving(keel_app)
