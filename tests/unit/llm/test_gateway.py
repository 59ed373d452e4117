"""The LLM gateway's core: keys, determinism, cost, SSE replay, error mapping, the prompt
cache on the real Redis and the ingress routes in process, against a real HTTP upstream
(graph/demo/llm_upstream.py in a thread)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.errors import (
    BadGateway,
    ConfigError,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    UpstreamTimeout,
    parse_user_config,
)
from deployments.ingress.rest.app import IngressConfig, create_app
from deployments.llm.chat import (
    CacheResult,
    ChatCall,
    ChatRequest,
    is_deterministic,
    parse_chat,
    replay_stream,
    sse_event,
    tenant_of,
)
from deployments.llm.config import LLMGatewayConfig, ModelPrice
from deployments.llm.gateway import ChatGateway
from deployments.llm.prompt_cache import decode_entry, encode_entry, prompt_key
from deployments.llm.upstream import transport_error, upstream_error
from deployments.storage.remote import redis_store
from graph.demo.llm_upstream import FakeUpstream
from tests.support.inprocess import InProcessLLM

REDIS_URL = "redis://127.0.0.1:6379/0"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def _request(**changes: Any) -> ChatRequest:
    body: dict[str, Any] = {"model": "m", "messages": MESSAGES, "temperature": 0}
    body.update(changes)
    return ChatRequest.model_validate(body)


def _key(tenant: str = "t", upstream: str = "u", model: str = "um", **changes: Any) -> str:
    return prompt_key(tenant, upstream, model, _request(**changes))


# --- keys ------------------------------------------------------------------------------


def test_every_input_that_decides_the_answer_changes_the_key() -> None:
    base = _key()
    variants = {
        "tenant": _key(tenant="other"), "upstream": _key(upstream="v"),
        "model": _key(model="um2"),
        "messages": _key(messages=[*MESSAGES[:1], {"role": "user", "content": "hi!"}]),
        "role": _key(messages=[{"role": "user", "content": "be brief"}, MESSAGES[1]]),
        "stream": _key(stream=True),
    }
    for name, value in [("temperature", 0.5), ("top_p", 0.9), ("max_tokens", 5),
                        ("stop", ["\n"]), ("seed", 1), ("n", 2), ("presence_penalty", 0.1),
                        ("frequency_penalty", 0.1), ("logit_bias", {"1": 2}),
                        ("response_format", {"type": "json_object"}),
                        ("tools", [{"type": "function", "function": {"name": "f"}}]),
                        ("tool_choice", "auto"), ("logprobs", True)]:
        variants[name] = _key(**{name: value})
    assert len(set(variants.values()) | {base}) == len(variants) + 1, variants
    # Fields that cannot change the answer do not split the cache.
    assert _key(user="alice", metadata={"x": "y"}) == base


def test_keys_are_pinned() -> None:
    """Keys are shared by every replica and survive upgrades: they must not drift."""
    assert _key() == ("keel:llm:c:t:"
                      "61e581be7f2d2b639d111a8a7e662a2ca716087b8054c59f54d144e70b0ce566")
    streamed = _request(stream=True, stream_options={"include_usage": True}, top_p=0.9,
                        user="x")
    assert prompt_key("acme", "fake", "up-model", streamed, hash_name="sha256",
                      prefix="p:") == ("p:c:acme:5dff9bcee65ac43677659c8280f180104f0175cca17a"
                                       "a16a166ce3a2d09c957a")


def test_field_order_and_nones_do_not_change_the_key() -> None:
    a = prompt_key("t", "u", "um", ChatRequest.model_validate(
        {"model": "m", "temperature": 0, "top_p": 1, "messages": MESSAGES}))
    b = prompt_key("t", "u", "um", ChatRequest.model_validate(
        {"top_p": 1, "messages": [{"content": "be brief", "role": "system"},
                                  {"content": "hi", "role": "user", "name": None}],
         "temperature": 0.0, "model": "m", "stop": None}))
    assert a == b and a.startswith("keel:llm:c:t:")


def test_determinism_policy() -> None:
    assert is_deterministic(_request(temperature=0))
    assert is_deterministic(_request(temperature=0.7, seed=3))
    assert not is_deterministic(_request(temperature=0.7))
    assert not is_deterministic(_request(temperature=None))  # OpenAI's default is 1


def test_cost_math() -> None:
    price = ModelPrice(input_per_1k=0.5, output_per_1k=1.5)
    assert price.cost(2000, 1000) == pytest.approx(2.5)
    assert ModelPrice().cost(10, 10) == 0


def test_entries_are_json_and_damage_is_a_value_error() -> None:
    data = encode_entry("completion", {"id": "x"}, {"prompt_tokens": 1})
    assert decode_entry(data, "completion") == ({"id": "x"}, {"prompt_tokens": 1})
    assert b"\x80" not in data  # JSON, never a pickle
    for bad in (b"garbage", data[:-3], encode_entry("stream", [], None), b"KLC1[1,2]"):
        with pytest.raises(ValueError):
            decode_entry(bad, "completion")


def test_sse_replay_has_openai_shape() -> None:
    chunks = [{"id": "c", "choices": [{"index": 0, "delta": {"content": "hé"}}]}]
    events = replay_stream(chunks)
    assert events == [sse_event(chunks[0]), "data: [DONE]\n\n"]
    assert events[0].startswith("data: {") and events[0].endswith("}\n\n")
    assert json.loads(events[0][len("data: "):]) == chunks[0]


# --- validation and error mapping ------------------------------------------------------


@pytest.mark.parametrize(("body", "error", "names"), [
    ({"model": "m"}, InvalidInput, "messages"),
    ({"model": "m", "messages": []}, InvalidInput, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, InvalidInput,
     "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": ""}]}, InvalidInput,
     "messages.0"),
    ({"messages": MESSAGES}, InvalidInput, "model"),
    ({"model": "m", "messages": MESSAGES, "temperature": 9}, InvalidInput, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x" * 101}]}, PayloadTooLarge,
     "messages"),
])
def test_bad_requests_name_the_field(body: dict[str, Any], error: type[Exception],
                                     names: str) -> None:
    with pytest.raises(error) as caught:
        parse_chat(body, max_prompt_chars=100)
    assert names in str(caught.value)
    assert type(caught.value) is error


def test_assistant_tool_calls_may_have_no_content() -> None:
    parse_chat({"model": "m", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}, 100)


def test_tenant_header() -> None:
    assert tenant_of(None) == "anonymous" and tenant_of("acme-1") == "acme-1"
    with pytest.raises(InvalidInput, match="X-Keel-Tenant"):
        tenant_of("a:b")


def test_upstream_errors_map_to_clear_statuses() -> None:
    body = json.dumps({"error": {"message": "slow down"}}).encode()
    limited = upstream_error("u", 429, {"retry-after": "12"}, body)
    assert isinstance(limited, RateLimited) and limited.retry_after_s == 12
    assert "slow down" in limited.message and "'u'" in limited.message
    assert isinstance(upstream_error("u", 500, {}, b"boom"), BadGateway)
    assert upstream_error("u", 503, {}, b"").status == 502
    assert isinstance(upstream_error("u", 400, {}, body), InvalidInput)
    assert upstream_error("u", 401, {}, body).status == 502  # Keel's key, not the client's
    unreachable = transport_error("u", "http://x/v1", httpx.ConnectError("no"), 5)
    assert unreachable.status == 502 and "http://x/v1" in unreachable.message
    timeout = transport_error("u", "http://x/v1", httpx.ReadTimeout("slow"), 5)
    assert isinstance(timeout, UpstreamTimeout) and "5" in timeout.message


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="upstreams"):
        parse_user_config(LLMGatewayConfig, {"upstreams": [
            {"name": "a", "base_url": "http://a", "models": {"m": "x"}},
            {"name": "b", "base_url": "http://b", "models": {"m": "y"}}]}, "LLMGateway")
    with pytest.raises(ConfigError, match="prices"):
        parse_user_config(LLMGatewayConfig, {"upstreams": [
            {"name": "a", "base_url": "http://a", "models": {"m": "x"},
             "prices": {"zz": {"input_per_1k": 1}}}]}, "LLMGateway")
    with pytest.raises(ConfigError, match="bogus"):
        parse_user_config(LLMGatewayConfig, {"bogus": 1}, "LLMGateway")
    assert LLMGatewayConfig().cache.ttl_s == 6 * 3600


# --- the gateway against a real upstream and the real Redis ----------------------------


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"keel:test:llm:{uuid.uuid4().hex[:8]}:"
    yield prefix
    with redis.Redis.from_url(REDIS_URL) as client:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)


def _config(url: str, prefix: str, **cache: Any) -> LLMGatewayConfig:
    return LLMGatewayConfig.model_validate({
        "upstreams": [{"name": "fake", "base_url": url, "models": {"pub": "up-model"},
                       "timeout_s": 1.0, "max_concurrency": 2, "queue_timeout_s": 0.2,
                       "prices": {"pub": {"input_per_1k": 1.0, "output_per_1k": 2.0}}}],
        "cache": {"key_prefix": prefix, **cache}, "max_prompt_chars": 1000})


def _call(content: str = "hello", tenant: str = "acme", **body: Any) -> ChatCall:
    return ChatCall(body={"model": "pub", "messages": [{"role": "user", "content": content}],
                          "temperature": 0, **body}, tenant=tenant, user=f"{tenant}-user")


@pytest.fixture
async def gateway(upstream: FakeUpstream, prefix: str) -> AsyncIterator[ChatGateway]:
    store = redis_store(REDIS_URL)
    gw = ChatGateway(store, _config(upstream.url, prefix))
    yield gw
    await gw.aclose()
    await store.client.aclose()


async def test_deterministic_prompt_is_cached_per_tenant(gateway: ChatGateway,
                                                         upstream: FakeUpstream) -> None:
    first = await gateway.complete(_call())
    second = await gateway.complete(_call())
    assert (first.cache, second.cache) == ("miss", "hit") and upstream.chat_calls() == 1
    assert second.body == first.body and second.body["usage"] == first.body["usage"]
    assert upstream.calls[0].body["model"] == "up-model"  # the public name is mapped
    other = await gateway.complete(_call(tenant="globex"))
    assert other.cache == "miss" and upstream.chat_calls() == 2
    hot = await gateway.complete(_call(temperature=0.9))
    assert hot.cache == "bypass" and upstream.chat_calls() == 3
    again = await gateway.complete(_call(temperature=0.9))
    assert again.cache == "bypass" and upstream.chat_calls() == 4
    usage = await gateway.usage()
    acme = usage["tenants"]["acme"]
    assert usage["source"] == "redis" and acme["requests"] == 4 and acme["cache_hits"] == 1
    tokens = first.body["usage"]
    price = (tokens["prompt_tokens"] * 1.0 + tokens["completion_tokens"] * 2.0) / 1000
    assert acme["cost_avoided_usd"] == pytest.approx(price, rel=1e-4)
    assert acme["cost_usd"] == pytest.approx(3 * price, rel=1e-4)
    assert acme["monthly_active_users"] == 1
    assert acme["cost_per_mau_usd"] == pytest.approx(3 * price, rel=1e-4)


async def test_cache_control_and_nondeterministic_policy(gateway: ChatGateway,
                                                         upstream: FakeUpstream,
                                                         prefix: str) -> None:
    await gateway.complete(_call())
    refreshed = await gateway.complete(ChatCall(**{**_call().__dict__,
                                                   "cache_control": "no-cache"}))
    assert refreshed.cache == "bypass" and upstream.chat_calls() == 2
    assert (await gateway.complete(_call())).cache == "hit"
    gateway.reconfigure(_config(upstream.url, prefix, cache_nondeterministic=True))
    assert (await gateway.complete(_call(temperature=1.2))).cache == "miss"
    assert (await gateway.complete(_call(temperature=1.2))).cache == "hit"


async def test_a_damaged_entry_is_a_miss_and_is_overwritten(gateway: ChatGateway,
                                                            upstream: FakeUpstream) -> None:
    request = parse_chat(_call().body, 1000)
    key = prompt_key("acme", "fake", "up-model", request, prefix=gateway.config.cache.key_prefix)
    await gateway.cache.set_many({key: b"\x80\x04not json"}, 60)
    assert (await gateway.complete(_call())).cache == "miss" and gateway.corrupt == 1
    assert (await gateway.complete(_call())).cache == "hit" and upstream.chat_calls() == 1


async def test_ttl_expiry(upstream: FakeUpstream, prefix: str) -> None:
    store = redis_store(REDIS_URL)
    gateway = ChatGateway(store, _config(upstream.url, prefix, ttl_s=0.3))
    assert (await gateway.complete(_call())).cache == "miss"
    assert (await gateway.complete(_call())).cache == "hit"
    await asyncio.sleep(0.4)
    assert (await gateway.complete(_call())).cache == "miss" and upstream.chat_calls() == 2
    await gateway.aclose()
    await store.client.aclose()


async def test_redis_down_still_answers_from_upstream(upstream: FakeUpstream,
                                                      prefix: str) -> None:
    dead = redis_store("redis://127.0.0.1:1/0")
    gateway = ChatGateway(dead, _config(upstream.url, prefix))
    assert (await gateway.complete(_call())).cache == "miss"
    assert (await gateway.complete(_call())).cache == "hit"  # the in-process fallback
    assert gateway.cache.errors >= 1
    usage = await gateway.usage()
    assert usage["source"] == "local" and usage["tenants"]["acme"]["requests"] == 2
    await gateway.aclose()


async def _collect(events: AsyncIterator[str]) -> tuple[str, list[str]]:
    head = await anext(events)
    return head, [e async for e in events]


async def test_streams_are_cached_and_replayed_with_the_same_events(
        gateway: ChatGateway, upstream: FakeUpstream) -> None:
    call = _call(stream=True, stream_options={"include_usage": True})
    head, events = await _collect(gateway.stream(call))
    assert head == "miss" and events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    head2, events2 = await _collect(gateway.stream(call))
    assert head2 == "hit" and events2 == events and upstream.chat_calls() == 1
    # Without include_usage the client gets no usage chunk; the ledger still counts tokens.
    plain_head, plain = await _collect(gateway.stream(_call("other", stream=True)))
    assert plain_head == "miss" and all(json.loads(e[6:])["choices"] for e in plain[:-1])
    assert upstream.calls[-1].body["stream_options"] == {"include_usage": True}
    usage = (await gateway.usage())["tenants"]["acme"]
    assert usage["completion_tokens"] > 2 * chunks[-1]["usage"]["completion_tokens"] - 1


async def test_upstream_failures(gateway: ChatGateway, upstream: FakeUpstream) -> None:
    with pytest.raises(RateLimited) as limited:
        await gateway.complete(_call("!status 429"))
    assert limited.value.retry_after_s == 7
    with pytest.raises(BadGateway, match="'fake' failed with 500"):
        await gateway.complete(_call("!status 500"))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"within 1\.0 s"):
        await gateway.complete(_call("!hang"))
    assert time.monotonic() - started < 3
    with pytest.raises(UpstreamTimeout):
        await anext(gateway.stream(_call("!hang", stream=True)))
    with pytest.raises(RateLimited):
        await anext(gateway.stream(_call("!status 429", stream=True)))
    with pytest.raises(ModelNotFound, match="'nope'"):
        await gateway.complete(ChatCall(body={"model": "nope", "messages": MESSAGES}))
    with pytest.raises(PayloadTooLarge):
        await gateway.complete(_call("x" * 2000))


async def test_concurrency_limit_is_503_after_the_queue_wait(gateway: ChatGateway) -> None:
    hung = [asyncio.ensure_future(gateway.complete(_call(f"!hang {i}"))) for i in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded, match="concurrency limit") as caught:
        await gateway.complete(_call("fresh"))
    assert caught.value.retry_after_s == 1
    for task in hung:
        with pytest.raises(UpstreamTimeout):
            await task


async def test_unreachable_upstream_is_502_naming_it(prefix: str) -> None:
    gateway = ChatGateway(None, _config("http://127.0.0.1:1/v1", prefix))
    started = time.monotonic()
    with pytest.raises(BadGateway, match=r"'fake' at http://127.0.0.1:1/v1 is unreachable"):
        await gateway.complete(_call())
    assert time.monotonic() - started < 3


async def test_the_api_key_comes_from_the_variable_the_upstream_names(
        upstream: FakeUpstream, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_LLM_API_KEY", "sk-default")
    monkeypatch.setenv("KEEL_TEST_UPSTREAM_KEY", "sk-named")
    monkeypatch.setenv("KEEL_TEST_EMPTY_KEY", "")
    authorizations = []
    for api_key_env in ("KEEL_LLM_API_KEY", "KEEL_TEST_UPSTREAM_KEY", "KEEL_TEST_EMPTY_KEY",
                        "KEEL_TEST_UNSET_KEY"):
        config = _config(upstream.url, prefix, enabled=False)
        config = config.model_copy(update={"upstreams": [
            config.upstreams[0].model_copy(update={"api_key_env": api_key_env})]})
        gateway = ChatGateway(None, config)
        await gateway.complete(_call())
        await gateway.aclose()
        authorizations.append(upstream.calls[-1].authorization)
    # Unset or empty: no Authorization header at all.
    assert authorizations == ["Bearer sk-default", "Bearer sk-named", None, None]


class RecordingObserver:
    """An ``LLMObserver`` (structurally: no base class) that keeps what it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def request(self, tenant: str, model: str, cache: CacheResult) -> None:
        self.seen.append(("request", tenant, model, cache))

    def tokens(self, tenant: str, model: str, prompt: int, completion: int,
               cached: bool) -> None:
        self.seen.append(("tokens", cached))

    def cost(self, tenant: str, model: str, spent_usd: float, avoided_usd: float) -> None:
        self.seen.append(("cost", spent_usd > 0, avoided_usd > 0))

    def upstream_call(self, upstream: str, model: str, outcome: str) -> None:
        self.seen.append(("upstream_call", upstream, model, outcome))

    def hit_ratio(self, ratio: float) -> None:
        self.seen.append(("hit_ratio", ratio))

    def cost_per_mau(self, tenant: str, usd: float) -> None:
        self.seen.append(("cost_per_mau", tenant, usd > 0))

    def cache_failed(self, operation: str) -> None:
        self.seen.append(("cache_failed", operation))


async def test_the_observer_is_told_everything(upstream: FakeUpstream, prefix: str) -> None:
    observer = RecordingObserver()
    store = redis_store(REDIS_URL)
    gateway = ChatGateway(store, _config(upstream.url, prefix), observer)
    await gateway.complete(_call())
    await gateway.complete(_call())
    with pytest.raises(RateLimited):
        await gateway.complete(_call("!status 429"))
    assert observer.seen == [
        ("upstream_call", "fake", "pub", "ok"), ("request", "acme", "pub", "miss"),
        ("tokens", False), ("cost", True, False), ("hit_ratio", 0.0),
        ("cost_per_mau", "acme", True),
        ("request", "acme", "pub", "hit"), ("tokens", True), ("cost", False, True),
        ("hit_ratio", 0.5), ("cost_per_mau", "acme", True),
        ("upstream_call", "fake", "pub", "429")]
    await gateway.aclose()
    await store.client.aclose()
    dead = ChatGateway(redis_store("redis://127.0.0.1:1/0"), _config(upstream.url, prefix),
                       observer)
    await dead.complete(_call())
    assert ("cache_failed", "MGET") in observer.seen
    await dead.aclose()


def test_routes_answer_http(upstream: FakeUpstream, prefix: str) -> None:
    class NoModels:
        def model_names(self) -> list[str]:
            return []

    gateway = ChatGateway(None, _config(upstream.url, prefix))
    app: FastAPI = create_app(NoModels(), IngressConfig,  # type: ignore[arg-type]
                              llm=InProcessLLM(gateway))
    with TestClient(app) as client:
        body = {"model": "pub", "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0}
        first = client.post("/v1/chat/completions", json=body, headers={"X-Keel-Tenant": "a"})
        second = client.post("/v1/chat/completions", json=body, headers={"X-Keel-Tenant": "a"})
        assert first.status_code == 200 and first.headers["x-keel-cache"] == "miss"
        assert second.headers["x-keel-cache"] == "hit" and second.json() == first.json()
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.text.endswith("data: [DONE]\n\n")
        limited = client.post("/v1/chat/completions",
                              json={**body, "messages": [{"role": "user",
                                                          "content": "!status 429"}]})
        assert limited.status_code == 429 and limited.headers["retry-after"] == "7"
        stream_500 = client.post("/v1/chat/completions", json={
            **body, "stream": True, "messages": [{"role": "user", "content": "!status 500"}]})
        assert stream_500.status_code == 502 and "fake" in stream_500.json()["error"]
        assert client.post("/v1/chat/completions", content=b"{").status_code == 400
        missing = client.post("/v1/chat/completions", json={"model": "pub"})
        assert missing.status_code == 400 and "messages" in missing.json()["error"]
        assert client.post("/v1/chat/completions",
                           json={**body, "model": "zz"}).status_code == 404
        usage = client.get("/v1/llm/usage").json()
        assert usage["tenants"]["a"]["requests"] == 2
    bare = create_app(NoModels(), IngressConfig)  # type: ignore[arg-type]
    with TestClient(bare) as client:
        off = client.post("/v1/chat/completions", json=body)
        assert off.status_code == 503 and "LLM gateway" in off.json()["error"]


async def test_concurrent_identical_misses_call_the_upstream_once(
        gateway: ChatGateway, upstream: FakeUpstream) -> None:
    upstream.delay_s = 0.2
    answers = await asyncio.gather(*(gateway.complete(_call("together")) for _ in range(5)))
    assert upstream.chat_calls() == 1
    assert sorted(a.cache for a in answers) == ["hit"] * 4 + ["miss"]
    assert all(a.body == answers[0].body for a in answers)


def test_build_app_binds_the_gateway_unless_turned_off(tmp_path: Any) -> None:
    from graph.app import build_app
    from tests.support.modelkit import write_linear_model

    write_linear_model(tmp_path, "a")
    ingress = build_app({"model_repository": str(tmp_path)})._bound_deployment
    gateway = ingress.init_kwargs["llm"]._bound_deployment
    assert gateway.name == "LLMGateway" and gateway.user_config == {}
    off = build_app({"model_repository": str(tmp_path), "llm": False})._bound_deployment
    assert off.init_kwargs["llm"] is None
