"""Ingress API-key authentication: the app in process through TestClient."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deployments.errors import ConfigError
from deployments.ingress import auth as auth_module
from deployments.ingress.auth import ApiKey, AuthConfig, announce, hash_key, load_auth
from deployments.ingress.rest.app import create_app
from deployments.llm.chat import ChatAnswer, ChatCall
from deployments.settings import AuthSettings
from graph.cli import main as cli_main
from tests.support.env import settings_from
from tests.support.inprocess import InProcessModels, MutableIngressConfig

GOOD = "k-good-0123456789abcdef-secret"
LIMITED = "k-limited-0123456789abcdef-secret"
TENANTED = "k-tenant-0123456789abcdef-secret"
WRONG = "k-wrong-0123456789abcdef-secret"

KEYS = AuthConfig(enabled=True, keys=(
    ApiKey(name="ops", sha256=hash_key(GOOD)),
    ApiKey(name="nanok-only", sha256=hash_key(LIMITED), models=("nanok",)),
    ApiKey(name="acme-app", sha256=hash_key(TENANTED), tenant="acme"),
))


class RecordingLLM:
    """An LLM backend that answers at once and keeps the calls it got."""

    def __init__(self) -> None:
        self.calls: list[ChatCall] = []

    async def complete(self, call: ChatCall) -> ChatAnswer:
        self.calls.append(call)
        return ChatAnswer(body={"ok": True}, cache="miss")

    def stream(self, call: ChatCall) -> AsyncIterator[str]:
        raise NotImplementedError

    async def usage(self) -> dict[str, Any]:
        return {}


def auth_from(env: dict[str, str]) -> AuthConfig:
    """The ingress's auth configuration in an environment that is exactly ``env``."""
    return load_auth(settings_from(AuthSettings, env))


@pytest.fixture
def llm() -> RecordingLLM:
    return RecordingLLM()


@pytest.fixture
def secured(backend: InProcessModels, ingress_config: MutableIngressConfig,
            llm: RecordingLLM) -> Iterator[TestClient]:
    app = create_app(backend, ingress_config, llm=llm, auth=KEYS)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _infer(client: TestClient, model: str = "linear", **headers: str) -> Any:
    x = np.zeros((1, 4), dtype=np.float32)
    body = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}
    return client.post(f"/v2/models/{model}/infer", json=body, headers=headers)


def test_no_key_or_a_wrong_key_is_401_with_www_authenticate(secured: TestClient) -> None:
    for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, {"X-API-Key": WRONG},
                    {"Authorization": f"Basic {GOOD}"}):
        answer = secured.get("/v2/models/linear", headers=headers)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    for path in ("/v1/cache", "/v1/slo", "/v1/rollouts", "/v1/payloads", "/v1/llm/usage"):
        assert secured.get(path).status_code == 401
    assert secured.post("/v1/decide", json={"model": "linear", "entities": []}) \
        .status_code == 401
    assert secured.post("/v1/chat/completions", json={"model": "m"}).status_code == 401


def test_a_good_key_works_through_both_headers(secured: TestClient) -> None:
    assert secured.get("/v2/models/linear", headers={"Authorization": f"Bearer {GOOD}"}) \
        .status_code == 200
    assert secured.get("/v2/models/linear", headers={"X-API-Key": GOOD}).status_code == 200
    assert _infer(secured, **{"X-API-Key": GOOD}).status_code == 200


def test_a_key_limited_to_another_model_is_403(secured: TestClient) -> None:
    headers = {"X-API-Key": LIMITED}
    denied = _infer(secured, "linear", **headers)
    assert denied.status_code == 403
    assert "nanok-only" in denied.json()["error"]
    assert secured.get("/v2/models/linear/versions/1/ready", headers=headers).status_code == 403
    assert secured.get("/v2/models/nanok", headers=headers).status_code == 200
    decide = secured.post("/v1/decide", headers=headers,
                          json={"model": "linear", "entities": [{"id": 1}]})
    assert decide.status_code == 403
    # its own model gets past auth (then 400/503: no decision rule, no feature store)
    allowed = secured.post("/v1/decide", headers=headers,
                           json={"model": "nanok", "entities": [{"id": 1}]})
    assert allowed.status_code not in (401, 403)
    chat = secured.post("/v1/chat/completions", headers=headers, json={"model": "gpt"})
    assert chat.status_code == 403


def test_probes_and_server_metadata_are_open(secured: TestClient) -> None:
    assert secured.get("/v2/health/live").status_code == 200
    assert secured.get("/v2/health/ready").status_code in (200, 503)
    assert secured.get("/v2").status_code == 200
    assert secured.get("/openapi.json").status_code == 200


def test_the_keys_tenant_overrides_the_tenant_header(secured: TestClient,
                                                     llm: RecordingLLM) -> None:
    body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
    assert secured.post("/v1/chat/completions", json=body,
                        headers={"X-API-Key": TENANTED, "X-Keel-Tenant": "other"}
                        ).status_code == 200
    assert secured.post("/v1/chat/completions", json=body,
                        headers={"X-API-Key": GOOD, "X-Keel-Tenant": "chosen"}
                        ).status_code == 200
    assert [c.tenant for c in llm.calls] == ["acme", "chosen"]


def test_key_plaintext_never_logged_nor_echoed(secured: TestClient,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    answers = [secured.get("/v2/models/linear", headers={"X-API-Key": WRONG}),
               _infer(secured, "linear", **{"Authorization": f"Bearer {LIMITED}"}),
               secured.post("/v1/decide", headers={"X-API-Key": LIMITED},
                            json={"model": "linear", "entities": []})]
    announce(KEYS)
    for key in (GOOD, LIMITED, WRONG, TENANTED):
        assert key not in caplog.text
        for answer in answers:
            assert key not in answer.text
            assert all(key not in v for v in answer.headers.values())


def test_every_stored_hash_is_compared_in_constant_time(
        secured: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    # the first stored key matches: the others are still compared (no early exit)
    assert secured.get("/v2/models/linear", headers={"X-API-Key": GOOD}).status_code == 200
    assert len(calls) == len(KEYS.keys)
    calls.clear()
    assert secured.get("/v2/models/linear", headers={"X-API-Key": WRONG}).status_code == 401
    assert len(calls) == len(KEYS.keys)


def test_auth_off_by_default_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    config = auth_from({})
    assert not config.enabled
    with caplog.at_level(logging.WARNING):
        announce(config)
    assert "authentication is OFF" in caplog.text


def test_keys_from_the_environment() -> None:
    entries = [{"name": "a", "sha256": hash_key(GOOD), "tenant": "t1", "models": ["linear"]}]
    config = auth_from({"KEEL_AUTH": "on", "KEEL_API_KEYS": json.dumps(entries)})
    assert config.enabled
    assert config.keys == (ApiKey(name="a", sha256=hash_key(GOOD), tenant="t1",
                                  models=("linear",)),)


def test_keys_from_a_file_json_or_yaml(tmp_path: Path) -> None:
    yaml_file = tmp_path / "keys.yaml"
    yaml_file.write_text(f"- name: b\n  sha256: {hash_key(GOOD)}\n")
    config = auth_from({"KEEL_AUTH": "on", "KEEL_API_KEYS_FILE": str(yaml_file)})
    assert [k.name for k in config.keys] == ["b"]
    assert config.keys[0].models == ("*",)
    json_file = tmp_path / "keys.json"
    json_file.write_text(json.dumps([{"name": "c", "sha256": hash_key(WRONG)}]))
    config = auth_from({"KEEL_AUTH": "on", "KEEL_API_KEYS_FILE": str(json_file)})
    assert [k.name for k in config.keys] == ["c"]


@pytest.mark.parametrize(("env", "names"), [
    ({"KEEL_API_KEYS": '[{"name": "a", "sha256": "nothex"}]'}, "0.sha256"),
    ({"KEEL_API_KEYS": '[{"name": "a", "sha256": "' + "0" * 64 + '", "key": "x"}]'},
     "0.key"),
    ({"KEEL_API_KEYS": "not json"}, "KEEL_API_KEYS"),
    ({"KEEL_AUTH": "maybe"}, "KEEL_AUTH"),
    ({"KEEL_AUTH": "on"}, "no key is configured"),
    ({"KEEL_API_KEYS_FILE": "/nonexistent/keys.yaml"}, "KEEL_API_KEYS_FILE"),
])
def test_malformed_configuration_is_refused_naming_the_field(env: dict[str, str],
                                                             names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        auth_from(env)
    assert names in caught.value.message


def test_hash_key_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["hash-key", GOOD, "--name", "x", "--tenant", "t"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry == {"name": "x", "sha256": hash_key(GOOD), "tenant": "t", "models": ["*"]}
    assert auth_from({"KEEL_AUTH": "on", "KEEL_API_KEYS": json.dumps([entry])}).keys
    assert cli_main(["hash-key", "short"]) == 2
