"""Payload logging: sampled answers appended to a real Redis Stream, off the response path."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from deployments.cache.core import PredictionCache
from deployments.cache.policy import CacheConfig
from deployments.errors import ConfigError, parse_user_config
from deployments.ingress.auth import ApiKey, AuthConfig, hash_key
from deployments.ingress.dataplane.config import IngressConfig
from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.pool.placement import EmbeddedModels, ModelPool
from deployments.ingress.rest.app import create_app
from deployments.ingress.rollout.payload_log import (
    EVENT_TYPE,
    PayloadLog,
    PayloadLogConfig,
    make_event,
)
from deployments.onnx.core import OnnxModelConfig
from deployments.repository import ModelRepository
from deployments.storage.remote import RedisStore, redis_store
from graph.cli import main
from tests.support.inprocess import InProcessModels, MutableIngressConfig
from tests.support.modelkit import reference_probabilities
from tests.support.redisserver import PrivateRedis, free_port

REDIS_URL = "redis://127.0.0.1:6379/0"


def _body(x: np.ndarray, **extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "features", "shape": list(x.shape),
                                   "datatype": "FP32", "data": x.reshape(-1).tolist()}],
                       **extra}).encode()


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def _events(stream: str, url: str = REDIS_URL) -> list[dict[str, Any]]:
    with redis.Redis.from_url(url) as client:
        return [json.loads(fields[b"event"]) for _, fields in client.xrange(stream)]


@pytest.fixture
def stream() -> Iterator[str]:
    name = f"keel-test:payloads:{uuid.uuid4().hex[:8]}"
    yield name
    with redis.Redis.from_url(REDIS_URL) as client:
        client.delete(name)


@pytest.fixture
async def store() -> AsyncIterator[RedisStore]:
    remote = redis_store(REDIS_URL)
    yield remote
    await remote.client.aclose()


def _plane(repository: ModelRepository, config: IngressConfig,
           cache: PredictionCache | None) -> DataPlane:
    embedded = EmbeddedModels(repository, ["linear"])
    embedded.apply({"linear": OnnxModelConfig(version="1")})
    return DataPlane(ModelPool(embedded, None), MutableIngressConfig(config), cache=cache,
                     redis=cache.remote if cache is not None else None)


def _cache(remote: RedisStore | None) -> PredictionCache:
    return PredictionCache(remote, CacheConfig(key_prefix=f"keel-test:{uuid.uuid4().hex[:8]}:",
                                               models={"linear": "always"}))


async def test_sampled_answers_land_in_the_stream_as_cloudevents(
        repository: ModelRepository, store: RedisStore, stream: str) -> None:
    config = IngressConfig(payloads=PayloadLogConfig(rate=1.0, stream=stream))
    plane = _plane(repository, config, _cache(store))
    sent = [_rows(i + 1, seed=300 + i) for i in range(4)]
    for i, x in enumerate(sent):
        answer = await plane.inference.infer("linear", None, _body(x, id=f"req-{i}"), None)
        assert answer.version == "1"
    await plane.inference.infer("linear", "1", _body(sent[0], id="pinned"), None)  # a hit, pinned
    await plane.payloads.settled()
    events = _events(stream)
    assert [e["data"]["request_id"] for e in events] == ["req-0", "req-1", "req-2", "req-3",
                                                         "pinned"]
    for event, x in zip(events, [*sent, sent[0]], strict=True):
        assert event["specversion"] == "1.0" and event["type"] == EVENT_TYPE
        assert event["subject"] == "linear/1" and event["source"].startswith("/keel/ingress/")
        assert event["datacontenttype"] == "application/json" and len(event["id"]) == 32
        assert event["time"].endswith("Z")
        data = event["data"]
        assert (data["endpoint"], data["model"], data["version"]) == ("infer", "linear", "1")
        assert data["rows"] == data["rows_logged"] == len(x)
        np.testing.assert_allclose(data["inputs"]["features"], x, rtol=1e-6)
        np.testing.assert_allclose(data["outputs"]["probabilities"],
                                   reference_probabilities(x, seed=0), atol=1e-5)
        assert data["latency_ms"] > 0 and data["key"] is None and data["tenant"] is None
    assert events[0]["data"]["cache"] == ["miss"]
    assert events[-1]["data"]["cache"] == ["hit"]  # the cache status of each row, as served
    assert plane.payloads.state()["logged"] == 5
    await plane.cache.settled()  # type: ignore[union-attr]


async def test_rows_beyond_max_rows_are_counted_not_logged_and_nan_is_null(
        repository: ModelRepository, store: RedisStore, stream: str) -> None:
    config = IngressConfig(payloads=PayloadLogConfig(rate=1.0, stream=stream, max_rows=3))
    plane = _plane(repository, config, _cache(store))
    x = _rows(8, seed=310)
    await plane.inference.infer("linear", None, _body(x), None)
    await plane.payloads.settled()
    [event] = _events(stream)
    assert event["data"]["rows"] == 8 and event["data"]["rows_logged"] == 3
    assert len(event["data"]["inputs"]["features"]) == 3
    assert len(event["data"]["outputs"]["probabilities"]) == 3
    assert event["data"]["request_id"] is None
    log = PayloadLog(store, lambda: config.payloads, source="/test")
    assert log.offer(lambda c: make_event(
        request_id="r", model="m", version="1", endpoint="infer",
        inputs={"x": np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32)},
        outputs={}, cache=["off", "off"], latency_ms=1.0, caller=None, source="/test",
        max_rows=c.max_rows))
    await log.settled()
    assert _events(stream)[-1]["data"]["inputs"]["x"] == [[1.0, None], [None, 2.0]]


async def test_the_stream_stays_near_max_len(store: RedisStore, stream: str) -> None:
    """``XADD ... MAXLEN ~ 50``: Redis trims whole nodes (100 entries by default), so the
    stream holds at most about max_len + 100 records, the newest ones."""
    config = PayloadLogConfig(rate=1.0, stream=stream, max_len=50)
    log = PayloadLog(store, lambda: config, source="/test")
    for i in range(1000):
        assert log.offer(lambda _, i=i: {"n": i})
        if i % 200 == 199:
            await log.settled()
    await log.settled()
    with redis.Redis.from_url(REDIS_URL) as client:
        length = client.xlen(stream)
        [(_, newest)] = client.xrevrange(stream, count=1)
    assert 50 <= length <= 150, length
    assert json.loads(newest[b"event"]) == {"n": 999}
    assert log.logged == 1000 and sum(log.dropped.values()) == 0


class GatedSink:
    """The real Redis behind a gate: nothing is written until the test opens it."""

    def __init__(self, remote: RedisStore) -> None:
        self.remote = remote
        self.gate = asyncio.Event()

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        await self.gate.wait()
        return await self.remote.execute(commands)


async def test_a_full_queue_drops_and_counts_and_never_waits(store: RedisStore,
                                                             stream: str) -> None:
    config = PayloadLogConfig(rate=1.0, stream=stream, queue=5)
    sink = GatedSink(store)
    log = PayloadLog(sink, lambda: config, source="/test")
    started = time.perf_counter()
    offered = [log.offer(lambda _, i=i: {"n": i}) for i in range(20)]
    assert time.perf_counter() - started < 0.5
    assert offered == [True] * 5 + [False] * 15
    assert log.dropped["queue_full"] == 15
    sink.gate.set()
    await log.settled()
    assert log.logged == 5 and [e["n"] for e in _events(stream)] == [0, 1, 2, 3, 4]


async def test_redis_stopped_mid_traffic_fails_no_request(repository: ModelRepository) -> None:
    private = PrivateRedis()
    private.start()
    remote = redis_store(private.url)
    stream = "keel:payloads"
    config = IngressConfig(payloads=PayloadLogConfig(rate=1.0))
    plane = _plane(repository, config, _cache(remote))
    plane.payloads.retry_after_s = 0.5

    async def traffic(n: int, seed: int) -> None:
        for i in range(n):
            x = _rows(2, seed=seed + i)
            answer = await plane.inference.infer("linear", None, _body(x), None)
            body = json.loads(answer.body)
            [out] = [o for o in body["outputs"] if o["name"] == "probabilities"]
            np.testing.assert_allclose(np.asarray(out["data"]).reshape(2, 2),
                                       reference_probabilities(x, seed=0), atol=1e-5)
        await plane.payloads.settled()

    try:
        await traffic(10, seed=400)
        assert plane.payloads.logged == 10 and len(_events(stream, private.url)) == 10
        private.stop()
        await traffic(10, seed=500)  # every answer still right; every record dropped
        assert plane.payloads.logged == 10 and plane.payloads.dropped["redis_error"] == 10
        private.start()
        await asyncio.sleep(0.6)  # the pause after the failure
        await traffic(5, seed=600)
        assert plane.payloads.logged == 15 and len(_events(stream, private.url)) == 5
    finally:
        await plane.cache.settled()  # type: ignore[union-attr]
        await remote.client.aclose()
        private.stop()


async def test_no_redis_configured_counts_every_sampled_record(
        repository: ModelRepository) -> None:
    config = IngressConfig(payloads=PayloadLogConfig(rate=1.0))
    plane = _plane(repository, config, None)
    await plane.inference.infer("linear", None, _body(_rows(1, seed=7)), None)
    assert plane.payloads.state()["dropped"]["no_redis"] == 1
    assert plane.payloads.state()["redis"] is False


def test_the_rate_samples_that_share_of_answers() -> None:
    config = PayloadLogConfig(rate=0.25)
    log = PayloadLog(None, lambda: config, source="/test", rng=random.Random(5))
    assert 900 <= sum(log.sampled() for _ in range(4000)) <= 1100
    for rate, expected in ((0.0, 0), (1.0, 100)):
        fixed = PayloadLogConfig(rate=rate)
        assert sum(PayloadLog(None, lambda c=fixed: c, source="/t").sampled()
                   for _ in range(100)) == expected


@pytest.mark.parametrize(("values", "field"), [
    ({"rate": 1.5}, "payloads.rate"),
    ({"rate": -0.1}, "payloads.rate"),
    ({"rate": "nan"}, "payloads.rate"),
    ({"stream": ""}, "payloads.stream"),
    ({"max_len": 0}, "payloads.max_len"),
    ({"queue": 0}, "payloads.queue"),
    ({"max_rows": 0}, "payloads.max_rows"),
    ({"drift_window": 50}, "payloads.drift_window"),
    ({"sample": 0.1}, "payloads.sample"),
])
def test_bad_payload_settings_are_refused_naming_the_field(values: dict[str, Any],
                                                           field: str) -> None:
    with pytest.raises(ValidationError):
        IngressConfig.model_validate({"payloads": values})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_user_config(IngressConfig, {"payloads": values}, "Ingress")


def test_the_caller_is_named_by_its_key_name_and_tenant_never_the_key(
        backend: InProcessModels, stream: str) -> None:
    secret = "tenant-key-" + uuid.uuid4().hex
    auth = AuthConfig(enabled=True, keys=(
        ApiKey(name="acme-app", sha256=hash_key(secret), tenant="acme"),))
    config = MutableIngressConfig(IngressConfig(
        payloads=PayloadLogConfig(rate=1.0, stream=stream)))
    remote = redis_store(REDIS_URL)
    app = create_app(backend, config, cache=_cache(remote), redis=remote, auth=auth)
    x = _rows(1, seed=9)
    with TestClient(app) as client:
        answer = client.post("/v2/models/linear/infer", content=_body(x),
                             headers={"Authorization": f"Bearer {secret}",
                                      "Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 10
        while not _events(stream):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        state = client.get("/v1/payloads", headers={"X-API-Key": secret}).json()
    [event] = _events(stream)
    assert (event["data"]["key"], event["data"]["tenant"]) == ("acme-app", "acme")
    with redis.Redis.from_url(REDIS_URL) as raw:
        assert secret.encode() not in raw.xrange(stream)[0][1][b"event"]
    assert state["logged"] == 1 and state["stream"] == stream and state["rate"] == 1.0


async def test_keel_payloads_tail_prints_the_newest_records_oldest_first(
        store: RedisStore, stream: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = PayloadLogConfig(rate=1.0, stream=stream)
    log = PayloadLog(store, lambda: config, source="/test")
    for i in range(5):
        log.offer(lambda _, i=i: {"n": i})
    await log.settled()
    assert main(["payloads", "tail", "-n", "3", "--stream", stream,
                 "--redis-url", REDIS_URL]) == 0
    assert [json.loads(line)["n"] for line in capsys.readouterr().out.splitlines()] == [2, 3, 4]
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    assert main(["payloads", "tail", "--stream", stream, "--redis-url", closed]) == 1
    assert "Redis at redis://127.0.0.1" in capsys.readouterr().err
