"""The LLM gateway on Ray Serve, driven by the official ``openai`` SDK.

A second Keel application (Ingress + LLMGateway + one model) is deployed next to
the session's main one; its upstream is a real OpenAI-compatible HTTP server in
this test process (graph/demo/llm_upstream.py), its prompt cache a private redis-server
that the last test stops.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from graph.demo.llm_upstream import FakeUpstream
from tests.support.redisserver import PrivateRedis
from tests.support.serve_app import KeelApp, serve_test_config

pytestmark = pytest.mark.slow

APP = "keel-llm"
PREFIX = "/llm"
TTL_S = 4.0
UPSTREAM_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm_app(keel_app: KeelApp, model_repo: Path, upstream: FakeUpstream,
            llm_redis: PrivateRedis) -> Iterator[str]:
    app = serve_test_config(model_repo)["applications"][0]
    app.update(name=APP, route_prefix=PREFIX, runtime_env={"env_vars": {
        "KEEL_REDIS_URL": llm_redis.url, "KEEL_LLM_API_KEY": "sk-test-secret"}})
    app["args"].update(models=["linear"], llm=True)
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("Ingress", "SloMonitor", "LLMGateway", "linear")]
    gateway = next(d for d in app["deployments"] if d["name"] == "LLMGateway")
    gateway["user_config"] = {
        "max_prompt_chars": 2000,
        "upstreams": [{"name": "fake", "base_url": upstream.url,
                       "models": {"keel-test": "fake-model-7b"},
                       "timeout_s": UPSTREAM_TIMEOUT_S, "max_concurrency": 8,
                       "prices": {"keel-test": {"input_per_1k": 0.5, "output_per_1k": 1.5}}}],
        "cache": {"ttl_s": TTL_S},
    }
    with keel_app.alongside(app) as url:
        yield url


@pytest.fixture
def client(llm_app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llm_app}/v1", api_key="unused", max_retries=0,
                         timeout=30)


def _ask(client: openai.OpenAI, content: str, tenant: str = "acme",
         **options: Any) -> tuple[str, Any]:
    raw = client.chat.completions.with_raw_response.create(
        model="keel-test", messages=[{"role": "user", "content": content}],
        extra_headers={"X-Keel-Tenant": tenant, "X-Keel-User": f"{tenant}-u1"},
        **{"temperature": 0, **options})
    return raw.headers["x-keel-cache"], raw.parse()


def test_identical_deterministic_prompt_calls_upstream_once(client: openai.OpenAI,
                                                            upstream: FakeUpstream) -> None:
    before = upstream.chat_calls()
    first_status, first = _ask(client, "what is keel?")
    second_status, second = _ask(client, "what is keel?")
    assert (first_status, second_status) == ("miss", "hit")
    assert upstream.chat_calls() == before + 1
    assert second.choices[0].message.content == first.choices[0].message.content
    assert "fake-model-7b" in first.choices[0].message.content  # the model name is mapped
    assert second.usage == first.usage and first.usage.completion_tokens > 0
    assert upstream.calls[-1].authorization == "Bearer sk-test-secret"  # from the env


def test_tenants_do_not_share_answers(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    before = upstream.chat_calls()
    assert _ask(client, "tenant question", tenant="acme")[0] == "miss"
    assert _ask(client, "tenant question", tenant="globex")[0] == "miss"
    assert upstream.chat_calls() == before + 2


def test_nondeterministic_requests_are_not_cached(client: openai.OpenAI,
                                                  upstream: FakeUpstream) -> None:
    before = upstream.chat_calls()
    statuses = [_ask(client, "be creative", temperature=0.8)[0] for _ in range(2)]
    assert statuses == ["bypass", "bypass"] and upstream.chat_calls() == before + 2
    assert _ask(client, "seeded", temperature=0.8, seed=7)[0] == "miss"
    assert _ask(client, "seeded", temperature=0.8, seed=7)[0] == "hit"


def test_entries_expire_after_the_ttl(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    assert _ask(client, "short-lived")[0] == "miss"
    assert _ask(client, "short-lived")[0] == "hit"
    time.sleep(TTL_S + 0.5)
    assert _ask(client, "short-lived")[0] == "miss"


def _stream(client: openai.OpenAI, content: str) -> list[dict[str, Any]]:
    stream = client.chat.completions.create(
        model="keel-test", messages=[{"role": "user", "content": content}], temperature=0,
        stream=True, stream_options={"include_usage": True},
        extra_headers={"X-Keel-Tenant": "acme"})
    return [chunk.model_dump(exclude_none=True) for chunk in stream]


def test_streaming_is_cached_and_replayed_chunk_for_chunk(client: openai.OpenAI,
                                                          upstream: FakeUpstream,
                                                          llm_app: str) -> None:
    before = upstream.chat_calls()
    first = _stream(client, "stream me")
    second = _stream(client, "stream me")
    assert upstream.chat_calls() == before + 1
    assert second == first and len(first) > 3
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in first if c["choices"])
    assert text.startswith("echo from fake-model-7b")
    assert first[-1]["usage"]["completion_tokens"] > 0  # include_usage's last chunk
    with httpx.stream("POST", f"{llm_app}/v1/chat/completions", timeout=30,
                      headers={"X-Keel-Tenant": "acme"},
                      json={"model": "keel-test", "stream": True, "temperature": 0,
                            "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": "stream me"}]}) as raw:
        assert raw.headers["x-keel-cache"] == "hit"
        assert raw.headers["content-type"].startswith("text/event-stream")
        body = "".join(raw.iter_text())
    assert body.startswith("data: {") and body.endswith("data: [DONE]\n\n")


def test_upstream_errors_reach_the_client_clearly(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as limited:
        _ask(client, "!status 429")
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.APIStatusError) as failed:
        _ask(client, "!status 500")
    assert failed.value.status_code == 502 and "fake" in failed.value.response.text
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as hung:
        _ask(client, "!hang")
    elapsed = time.monotonic() - started
    assert hung.value.status_code == 504 and elapsed < UPSTREAM_TIMEOUT_S + 8, elapsed
    with pytest.raises(openai.APIStatusError) as stream_failed:
        _stream(client, "!status 500")
    assert stream_failed.value.status_code == 502


def test_bad_requests_name_the_field(llm_app: str) -> None:
    url = f"{llm_app}/v1/chat/completions"
    missing = httpx.post(url, json={"model": "keel-test"}, timeout=30)
    assert missing.status_code == 400 and "messages" in missing.json()["error"]
    role = httpx.post(url, json={"model": "keel-test", "messages": [
        {"role": "wizard", "content": "x"}]}, timeout=30)
    assert role.status_code == 400 and "messages.0.role" in role.json()["error"]
    empty = httpx.post(url, json={"model": "keel-test", "messages": [
        {"role": "user", "content": ""}]}, timeout=30)
    assert empty.status_code == 400 and "content" in empty.json()["error"]
    big = httpx.post(url, json={"model": "keel-test", "messages": [
        {"role": "user", "content": "x" * 3000}]}, timeout=30)
    assert big.status_code == 413 and "messages" in big.json()["error"]
    unknown = httpx.post(url, json={"model": "gpt-9", "messages": [
        {"role": "user", "content": "x"}]}, timeout=30)
    assert unknown.status_code == 404 and "gpt-9" in unknown.json()["error"]


def test_usage_summary(llm_app: str) -> None:
    usage = httpx.get(f"{llm_app}/v1/llm/usage", timeout=30).json()
    acme = usage["tenants"]["acme"]
    assert usage["source"] == "redis" and acme["requests"] > acme["cache_hits"] > 0
    assert acme["cost_usd"] > 0 and acme["cost_avoided_usd"] > 0
    assert acme["monthly_active_users"] == 1 and acme["cost_per_mau_usd"] == acme["cost_usd"]
    assert usage["models"] == {"keel-test": "fake"}


def test_main_app_without_an_upstream_answers_502_naming_it(http: httpx.Client) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8001)) == 0:
            pytest.skip("something listens on 127.0.0.1:8001 (the example upstream)")
    started = time.monotonic()
    answer = http.post("/v1/chat/completions", json={
        "model": "qwen2.5-1.5b", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 502 and "local-vllm" in answer.json()["error"]
    assert time.monotonic() - started < 10


def test_redis_down_still_serves_from_upstream(client: openai.OpenAI, upstream: FakeUpstream,
                                               llm_redis: PrivateRedis) -> None:
    llm_redis.stop()  # last test of the module: the app's Redis is gone
    before = upstream.chat_calls()
    status, answer = _ask(client, "redis is down")
    assert status == "miss" and answer.choices[0].message.content
    assert upstream.chat_calls() == before + 1
