"""The prediction cache core against a real Redis (127.0.0.1:6379; `.ci/run` starts one)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from deployments.cache.core import PredictionCache
from deployments.cache.keys import row_keys
from deployments.cache.policy import CacheConfig
from deployments.cache.rows import decode_row, encode_row
from deployments.storage.remote import RedisStore, redacted, redis_store, redis_store_from_env
from tests.support.redisserver import PrivateRedis, TlsFiles, free_port

REDIS_URL = "redis://127.0.0.1:6379/0"


def _x(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


# --- keys ------------------------------------------------------------------------------


def test_same_row_same_key_and_rows_keyed_alone() -> None:
    x = _x(3)
    keys = row_keys("m", "1", {"features": x})
    assert len(set(keys)) == 3
    assert keys == row_keys("m", "1", {"features": x.copy()})
    assert [row_keys("m", "1", {"features": x[i:i + 1]})[0] for i in range(3)] == keys


@pytest.mark.parametrize("change", ["model", "version", "dtype", "shape", "value", "name",
                                    "hash"])
def test_any_change_changes_the_key(change: str) -> None:
    x = _x(1)
    base = row_keys("m", "1", {"features": x})[0]
    args: dict[str, Any] = {"model": "m", "version": "1", "inputs": {"features": x}}
    if change == "model":
        args["model"] = "m2"
    elif change == "version":
        args["version"] = "2"
    elif change == "dtype":
        args["inputs"] = {"features": x.astype(np.float64)}
    elif change == "shape":
        args["inputs"] = {"features": x.reshape(1, 2, 2)}
    elif change == "value":
        y = x.copy()
        y[0, 3] = np.nextafter(y[0, 3], np.float32(10))
        args["inputs"] = {"features": y}
    elif change == "name":
        args["inputs"] = {"other": x}
    key = row_keys(args["model"], args["version"], args["inputs"],
                   hash_name="sha256" if change == "hash" else "blake3")
    assert key[0] != base


def test_key_prefix_and_refusals() -> None:
    assert row_keys("m", "1", {"a": _x(1)}, prefix="p:")[0].startswith("p:")
    with pytest.raises(ValueError, match="number of rows"):
        row_keys("m", "1", {"a": _x(2), "b": _x(3)})
    with pytest.raises(ValueError, match="object"):
        row_keys("m", "1", {"a": np.array([["x"]], dtype=object)})


# --- values ----------------------------------------------------------------------------


def test_rows_round_trip_exactly() -> None:
    outputs = {"probabilities": np.array([0.25, 0.75], dtype=np.float32),
               "label": np.array(1, dtype=np.int64),
               "flags": np.array([True, False])}
    back = decode_row(encode_row(outputs))
    assert list(back) == list(outputs)
    for name, value in outputs.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)


@pytest.mark.parametrize("poison", [b"", b"garbage", b"KPC1", b"KPC1\x05\x00\x00\x00[{]}",
                                    b"KPC1\x02\x00\x00\x00{}", b"__pickle__"])
def test_damaged_entries_are_refused(poison: bytes) -> None:
    with pytest.raises(ValueError):
        decode_row(poison)


def test_truncated_and_padded_entries_are_refused() -> None:
    good = encode_row({"p": np.array([0.5, 0.5], dtype=np.float32)})
    with pytest.raises(ValueError):
        decode_row(good[:-1])
    with pytest.raises(ValueError):
        decode_row(good + b"\x00")


# --- the in-process fallback -----------------------------------------------------------


# --- the cache against Redis -----------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    c = aioredis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


def _config(**changes: Any) -> CacheConfig:
    return CacheConfig(key_prefix=f"keel-test:{uuid.uuid4().hex[:8]}:", **changes)


class Model:
    """A real computation standing in for the model: counts the rows it is asked for."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[list[int]] = []
        self.delay_s = delay_s

    def compute_for(self, x: np.ndarray) -> Any:
        async def compute(rows: list[int]) -> dict[str, np.ndarray]:
            self.calls.append(list(rows))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return {"score": np.array([[x[i].sum()] for i in rows], dtype=np.float32)}
        return compute


async def test_miss_then_hit_with_one_mget_and_ttl(client: Any) -> None:
    config = _config(ttl_s=30)
    cache = PredictionCache(RedisStore(client), config)
    x = _x(4)
    keys = cache.keys("m", "1", {"features": x})
    model = Model()
    first, statuses = await cache.fetch("m", keys, model.compute_for(x))
    assert statuses == ["miss"] * 4 and model.calls == [[0, 1, 2, 3]]
    second, statuses = await cache.fetch("m", keys, model.compute_for(x))
    assert statuses == ["hit"] * 4 and len(model.calls) == 1
    np.testing.assert_array_equal(first["score"], second["score"])
    await cache.settled()  # written back after the answer
    ttl_ms = await client.pttl(keys[0])
    assert 0 < ttl_ms <= 30_000
    assert cache.counters.hits == {"m": 4} and cache.counters.misses == {"m": 4}
    assert cache.counters.hit_ratio("m") == 0.5
    await client.delete(*keys)


class Timings:
    """A cache observer that keeps what it is told."""

    def __init__(self) -> None:
        self.lookups: list[tuple[str, int, int, int, float]] = []
        self.writes: list[tuple[str, float, int, int]] = []
        self.failures: list[str] = []

    def rows(self, model: str, hits: int, misses: int, shared: int, lookup_ms: float,
             version: str = "") -> None:
        self.lookups.append((model, hits, misses, shared, lookup_ms))

    def stored(self, model: str, write_ms: float, local_entries: int, evictions: int) -> None:
        self.writes.append((model, write_ms, local_entries, evictions))

    def remote_failed(self, operation: str) -> None:
        self.failures.append(operation)


async def test_lookups_and_write_backs_are_timed_and_the_local_layer_counted(
        client: Any) -> None:
    """Triton's cache metrics: lookup and insertion durations per model, plus the
    in-process layer's size and evictions."""
    cache = PredictionCache(RedisStore(client), _config(local_max_entries=3))
    observer = cache.observer = Timings()
    x = _x(5)
    keys = cache.keys("m", "1", {"features": x})
    model = Model()
    await cache.fetch("m", keys[:2], model.compute_for(x))
    await cache.settled()
    await cache.fetch("m", keys, model.compute_for(x))  # 2 hits, 3 computed: 2 evicted
    await cache.settled()
    assert [(m, h, mi, sh) for m, h, mi, sh, _ in observer.lookups] == [
        ("m", 0, 2, 0), ("m", 2, 3, 0)]
    assert all(0 < ms < 1000 for *_, ms in observer.lookups)
    assert [(m, entries, evicted) for m, _, entries, evicted in observer.writes] == [
        ("m", 2, 0), ("m", 3, 2)]
    assert all(0 < ms < 1000 for _, ms, _, _ in observer.writes)
    assert cache.store.local.evictions == 2 and observer.failures == []
    await client.delete(*keys)


async def test_duplicate_rows_in_one_request_compute_once(client: Any) -> None:
    cache = PredictionCache(RedisStore(client), _config())
    x = np.repeat(_x(1), 3, axis=0)
    keys = cache.keys("m", "1", {"features": x})
    model = Model()
    values, statuses = await cache.fetch("m", keys, model.compute_for(x))
    assert model.calls == [[0]] and len(values["score"]) == 3 and statuses == ["miss"] * 3
    np.testing.assert_array_equal(values["score"], np.repeat(values["score"][:1], 3, axis=0))
    await cache.settled()
    await client.delete(*set(keys))


async def test_concurrent_identical_misses_compute_once(client: Any) -> None:
    cache = PredictionCache(RedisStore(client), _config())
    x = _x(2)
    keys = cache.keys("m", "1", {"features": x})
    model = Model(delay_s=0.2)
    (a, sa), (b, sb) = await asyncio.gather(cache.fetch("m", keys, model.compute_for(x)),
                                            cache.fetch("m", keys, model.compute_for(x)))
    assert model.calls == [[0, 1]]
    assert sorted([sa, sb]) == [["miss", "miss"], ["shared", "shared"]]
    np.testing.assert_array_equal(a["score"], b["score"])
    await cache.settled()
    await client.delete(*keys)


async def test_a_failed_computation_reaches_every_waiter_and_caches_nothing(
        client: Any) -> None:
    cache = PredictionCache(RedisStore(client), _config())
    x = _x(1)
    keys = cache.keys("m", "1", {"features": x})

    async def broken(rows: list[int]) -> dict[str, np.ndarray]:
        await asyncio.sleep(0.1)
        raise RuntimeError("model failed")

    results = await asyncio.gather(cache.fetch("m", keys, broken),
                                   cache.fetch("m", keys, broken), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await client.exists(*keys) == 0
    model = Model()
    _, statuses = await cache.fetch("m", keys, model.compute_for(x))
    assert statuses == ["miss"]
    await client.delete(*keys)


async def test_a_cancelled_leader_leaves_its_waiters_to_compute_for_themselves(
        client: Any) -> None:
    """A client that disconnects (or runs out of time) while computing rows that another
    request waits on must not fail that other request."""
    cache = PredictionCache(RedisStore(client), _config())
    x = _x(3)
    keys = cache.keys("m", "1", {"features": x})
    slow, fast = Model(delay_s=5.0), Model()
    leader = asyncio.create_task(cache.fetch("m", keys[:2], slow.compute_for(x[:2])))
    await asyncio.sleep(0.05)  # the leader is computing rows 0 and 1
    waiter = asyncio.create_task(cache.fetch("m", keys, fast.compute_for(x)))
    await asyncio.sleep(0.05)  # the waiter computes row 2 and waits on rows 0 and 1
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    values, statuses = await asyncio.wait_for(waiter, 5)
    assert statuses == ["miss"] * 3
    assert fast.calls == [[2], [0, 1]]  # its own row, then the two the leader abandoned
    await cache.settled()
    for i in range(3):
        assert values["score"][i][0] == pytest.approx(float(x[i].sum()))
        np.testing.assert_array_equal(decode_row(await client.get(keys[i]))["score"],
                                      values["score"][i])
    assert not cache._inflight
    await client.delete(*keys)


async def test_a_cancelled_waiter_is_cancelled_and_the_leader_finishes(client: Any) -> None:
    cache = PredictionCache(RedisStore(client), _config())
    x = _x(1)
    keys = cache.keys("m", "1", {"features": x})
    model = Model(delay_s=0.3)
    leader = asyncio.create_task(cache.fetch("m", keys, model.compute_for(x)))
    await asyncio.sleep(0.05)
    waiter = asyncio.create_task(cache.fetch("m", keys, model.compute_for(x)))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    _, statuses = await leader
    assert statuses == ["miss"] and model.calls == [[0]]
    await client.delete(*keys)


async def test_poisoned_entry_is_a_miss_and_is_overwritten(client: Any) -> None:
    cache = PredictionCache(RedisStore(client), _config())
    x = _x(1)
    keys = cache.keys("m", "1", {"features": x})
    await client.set(keys[0], b"\x80\x04K\x01.")  # a pickle, of all things
    model = Model()
    values, statuses = await cache.fetch("m", keys, model.compute_for(x))
    assert statuses == ["miss"] and model.calls == [[0]] and cache.counters.corrupt == 1
    await cache.settled()
    np.testing.assert_array_equal(decode_row(await client.get(keys[0]))["score"],
                                  values["score"][0])
    await client.delete(*keys)


async def test_disabled_cache_always_computes(client: Any) -> None:
    cache = PredictionCache(RedisStore(client), _config(enabled=False))
    x = _x(1)
    keys = cache.keys("m", "1", {"features": x})
    model = Model()
    for _ in range(2):
        _, statuses = await cache.fetch("m", keys, model.compute_for(x))
        assert statuses == ["miss"]
    assert len(model.calls) == 2 and await client.exists(*keys) == 0


async def test_unreachable_redis_falls_back_in_process() -> None:
    store = redis_store(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    cache = PredictionCache(store, _config(retry_after_s=60))
    x = _x(2)
    keys = cache.keys("m", "1", {"features": x})
    model = Model()
    _, statuses = await cache.fetch("m", keys, model.compute_for(x))
    assert statuses == ["miss", "miss"] and cache.counters.errors == 1
    assert not cache.remote_available
    _, statuses = await cache.fetch("m", keys, model.compute_for(x))
    assert statuses == ["hit", "hit"] and len(model.calls) == 1
    assert cache.counters.errors == 1  # no retry until retry_after_s


@pytest.fixture
def second_redis() -> Iterator[tuple[int, Any]]:
    """A private redis-server on its own port (never the machine's), restartable."""
    server = PrivateRedis()
    server.start()
    yield server.port, (server.start, server.stop)
    server.stop()


async def test_redis_dies_mid_traffic_and_comes_back(second_redis: tuple[int, Any]) -> None:
    port, (start, stop) = second_redis
    store = redis_store(f"redis://127.0.0.1:{port}/0")
    cache = PredictionCache(store, _config(retry_after_s=0.2, log_interval_s=0))
    x = _x(3)
    model = Model()
    keys = cache.keys("m", "1", {"features": x})
    _, statuses = await cache.fetch("m", keys[:1], model.compute_for(x))
    assert statuses == ["miss"] and cache.counters.errors == 0
    stop()
    # Redis is gone: answers keep coming, from the model and the in-process fallback.
    for _ in range(3):
        values, _ = await cache.fetch("m", keys[1:2], model.compute_for(x[1:2]))
        assert values["score"].shape == (1, 1)
    assert cache.counters.errors >= 1
    start()
    await asyncio.sleep(0.3)  # past retry_after_s: Redis is tried again
    _, statuses = await cache.fetch("m", keys[2:], model.compute_for(x[2:]))
    assert statuses == ["miss"] and cache.remote_available
    await cache.settled()
    check = redis.Redis(port=port)
    assert check.exists(keys[2]) == 1  # written to the Redis that came back
    check.close()
    await store.client.aclose()


async def test_tls_and_password_from_the_environment(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``rediss://`` with a private CA and a password, configured only through KEEL_REDIS_*."""
    tls = TlsFiles.create(tmp_path)
    server = PrivateRedis(password="s3cret-pw", tls=tls)
    server.start()
    try:
        monkeypatch.setenv("KEEL_REDIS_URL", server.url)
        monkeypatch.setenv("KEEL_REDIS_PASSWORD", "s3cret-pw")
        monkeypatch.setenv("KEEL_REDIS_SSL_CA_CERTS", str(tls.ca))
        # Generous: a TLS handshake on a busy 2-core machine can take longer than 0.2 s.
        monkeypatch.setenv("KEEL_REDIS_SOCKET_TIMEOUT_S", "2")
        monkeypatch.setenv("KEEL_REDIS_CONNECT_TIMEOUT_S", "2")
        store = redis_store_from_env()
        assert store is not None
        cache = PredictionCache(store, _config())
        x = _x(2)
        keys = cache.keys("m", "1", {"features": x})
        model = Model()
        _, statuses = await cache.fetch("m", keys, model.compute_for(x))
        assert statuses == ["miss", "miss"] and cache.counters.errors == 0
        _, statuses = await cache.fetch("m", keys, model.compute_for(x))
        assert statuses == ["hit", "hit"] and len(model.calls) == 1
        await cache.settled()
        with server.client() as check:
            assert check.exists(*keys) == 2  # really stored over TLS
        await store.client.aclose()
        # The wrong password is a counted cache error, never an exception.
        monkeypatch.setenv("KEEL_REDIS_PASSWORD", "wrong")
        wrong = redis_store_from_env()
        assert wrong is not None
        denied = PredictionCache(wrong, _config())
        _, statuses = await denied.fetch("m", keys, model.compute_for(x))
        assert statuses == ["miss", "miss"] and denied.counters.errors == 1
        await wrong.client.aclose()
    finally:
        server.stop()
    monkeypatch.setenv("KEEL_REDIS_URL", "")
    assert redis_store_from_env() is None
    assert redacted("rediss://:s3cret-pw@cache.example:6380/0") == "rediss://***@cache.example:6380/0"
