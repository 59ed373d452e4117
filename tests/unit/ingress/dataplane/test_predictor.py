"""The prediction cache wired into ``/v2/.../infer``: real Redis, real ONNX models in process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from deployments.cache.core import PredictionCache
from deployments.cache.policy import CacheConfig
from deployments.cache.rows import decode_row, encode_row
from deployments.contracts import InferCall, InferResult
from deployments.errors import KeelError
from deployments.ingress.rest.app import IngressConfig, create_app
from deployments.onnx.core import OnnxModelConfig
from deployments.repository import ModelRepository
from deployments.storage.remote import redis_store
from tests.support.inprocess import InProcessModels, MutableIngressConfig
from tests.support.modelkit import reference_probabilities

REDIS_URL = "redis://127.0.0.1:6379/0"  # the machine's (tests/unit/conftest.py)

ATOL = 1e-5


class CountingModels(InProcessModels):
    """The in-process models, recording how many rows each call sent to a model."""

    def __init__(self, repository: ModelRepository) -> None:
        super().__init__(repository)
        self.rows_seen: list[int] = []

    async def infer_many(self, name: str, calls: list[InferCall]
                         ) -> Sequence[InferResult | KeelError]:
        for call in calls:
            self.rows_seen.append(int(next(iter(call.inputs.values())).shape[0]))
        return await super().infer_many(name, calls)



@pytest.fixture
def counting(repository: ModelRepository) -> CountingModels:
    models = CountingModels(repository)
    models.apply("linear", OnnxModelConfig(version="1"))  # so that a test can bump it to 2
    return models


def _make_client(models: InProcessModels, config: MutableIngressConfig,
                 cache: PredictionCache) -> TestClient:
    return TestClient(create_app(models, config, cache=cache), raise_server_exceptions=False)


@pytest.fixture
def setup(counting: CountingModels, prefix: str
          ) -> Iterator[tuple[TestClient, PredictionCache, MutableIngressConfig]]:
    # "always": these tests are about what the cache does; the in-process models are so
    # cheap that the default "auto" policy would (rightly) skip it. See test_auto_policy_*.
    config = MutableIngressConfig(IngressConfig(cache=CacheConfig(key_prefix=prefix,
                                                                  policy="always")))
    cache = PredictionCache(redis_store(REDIS_URL), config.value.cache)
    with _make_client(counting, config, cache) as client:
        yield client, cache, config


def _eventually(probe: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """``probe()``'s first truthy answer (work done after the answer needs a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def _infer(client: TestClient, x: np.ndarray, path: str = "/v2/models/linear/infer",
           **extra: Any) -> httpx.Response:
    return client.post(path, json={"inputs": [{"name": "features", "shape": list(x.shape),
                                               "datatype": "FP32",
                                               "data": x.reshape(-1).tolist()}], **extra})


def _probabilities(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    [out] = [o for o in response.json()["outputs"] if o["name"] == "probabilities"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_second_identical_request_is_a_hit_with_identical_answer(setup: Any,
                                                                  counting: CountingModels
                                                                  ) -> None:
    client, cache, _ = setup
    x = _rows(3, seed=1)
    first = _infer(client, x)
    assert first.headers["x-keel-cache"] == "miss"
    second = _infer(client, x)
    assert second.headers["x-keel-cache"] == "hit"
    assert counting.rows_seen == [3], "the hit must not reach the model"
    np.testing.assert_array_equal(_probabilities(first), _probabilities(second))
    np.testing.assert_allclose(_probabilities(second), reference_probabilities(x, seed=0),
                               atol=ATOL)
    assert second.json()["outputs"][1]["data"] == first.json()["outputs"][1]["data"]
    assert cache.counters.hits["linear"] == 3 and cache.counters.misses["linear"] == 3


def test_only_missed_rows_go_to_the_model_and_order_is_kept(setup: Any,
                                                             counting: CountingModels) -> None:
    client, _, _ = setup
    x = _rows(5, seed=2)
    _infer(client, x[[1, 3]])
    answer = _infer(client, x)
    assert answer.headers["x-keel-cache"] == "partial"
    assert counting.rows_seen == [2, 3]
    np.testing.assert_allclose(_probabilities(answer), reference_probabilities(x, seed=0),
                               atol=ATOL)


def test_duplicate_rows_in_one_request_compute_once(setup: Any,
                                                    counting: CountingModels) -> None:
    client, _, _ = setup
    x = _rows(1, seed=3).repeat(4, axis=0)
    answer = _infer(client, x)
    assert counting.rows_seen == [1]
    probabilities = _probabilities(answer)
    assert probabilities.shape == (4, 2) and (probabilities == probabilities[0]).all()


def test_a_new_version_misses_and_a_pinned_old_version_still_hits(setup: Any,
                                                                   counting: CountingModels
                                                                   ) -> None:
    client, _, _ = setup
    x = _rows(2, seed=4)
    assert _infer(client, x).json()["model_version"] == "1"
    counting.apply("linear", OnnxModelConfig(version="2"))
    client.app.state.plane.catalog.forget()  # as if status_ttl_s had passed
    answer = _infer(client, x)
    assert answer.headers["x-keel-cache"] == "miss"
    assert answer.json()["model_version"] == "2"
    np.testing.assert_allclose(_probabilities(answer), reference_probabilities(x, seed=1),
                               atol=ATOL)
    pinned = _infer(client, x, path="/v2/models/linear/versions/1/infer")
    assert pinned.headers["x-keel-cache"] == "hit"
    assert pinned.json()["model_version"] == "1"
    np.testing.assert_allclose(_probabilities(pinned), reference_probabilities(x, seed=0),
                               atol=ATOL)


def test_output_subset_is_served_from_a_cached_row(setup: Any) -> None:
    client, _, _ = setup
    x = _rows(2, seed=5)
    _infer(client, x)
    answer = _infer(client, x, outputs=[{"name": "label"}])
    assert answer.headers["x-keel-cache"] == "hit"
    assert [o["name"] for o in answer.json()["outputs"]] == ["label"]
    assert answer.json()["outputs"][0]["data"] == \
        reference_probabilities(x, seed=0).argmax(axis=1).tolist()


def test_a_poisoned_entry_is_a_miss_and_is_overwritten(setup: Any, prefix: str) -> None:
    client, cache, _ = setup
    x = _rows(1, seed=6)
    [key] = cache.keys("linear", "1", {"features": x})
    sync = redis.Redis.from_url(REDIS_URL)
    try:
        sync.set(key, b"\x80\x04not a keel entry", px=60_000)
        answer = _infer(client, x)
        assert answer.headers["x-keel-cache"] == "miss"
        np.testing.assert_allclose(_probabilities(answer), reference_probabilities(x, seed=0),
                                   atol=ATOL)
        assert cache.counters.corrupt == 1
        stored = _eventually(lambda: sync.get(key))  # written back after the answer
        assert stored is not None and stored.startswith(b"KPC1")
        assert _infer(client, x).headers["x-keel-cache"] == "hit"
    finally:
        sync.close()


def test_a_valid_entry_under_the_key_is_served_as_is(setup: Any) -> None:
    """What the cache holds is what is answered: proves hits really come from Redis."""
    client, cache, _ = setup
    x = _rows(1, seed=7)
    [key] = cache.keys("linear", "1", {"features": x})
    planted = {"probabilities": np.array([0.25, 0.75], np.float32),
               "label": np.array(1, np.int64)}
    sync = redis.Redis.from_url(REDIS_URL)
    try:
        sync.set(key, encode_row(planted), px=60_000)
    finally:
        sync.close()
    answer = _infer(client, x)
    assert answer.headers["x-keel-cache"] == "hit"
    np.testing.assert_array_equal(_probabilities(answer), [[0.25, 0.75]])


def test_ttl_expiry_and_disabling_are_live(setup: Any, counting: CountingModels,
                                           prefix: str) -> None:
    client, cache, config = setup
    short = IngressConfig(cache=CacheConfig(key_prefix=prefix, ttl_s=0.3, policy="always"))
    config.value = short
    cache.reconfigure(short.cache)
    x = _rows(1, seed=8)
    _infer(client, x)
    assert _infer(client, x).headers["x-keel-cache"] == "hit"
    time.sleep(0.5)
    assert _infer(client, x).headers["x-keel-cache"] == "miss"
    off = IngressConfig(cache=CacheConfig(key_prefix=prefix, enabled=False))
    config.value = off
    cache.reconfigure(off.cache)
    before = len(counting.rows_seen)
    assert _infer(client, x).headers["x-keel-cache"] == "off"
    assert len(counting.rows_seen) == before + 1


def test_a_model_without_a_free_batch_dimension_is_not_cached(setup: Any) -> None:
    client, _, _ = setup
    answer = _infer(client, _rows(1, seed=9), path="/v2/models/fixed/infer")
    assert answer.status_code == 200
    assert answer.headers["x-keel-cache"] == "off"


def test_redis_unreachable_at_start_serves_from_the_fallback(counting: CountingModels,
                                                             prefix: str) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    config = MutableIngressConfig(IngressConfig(cache=CacheConfig(key_prefix=prefix,
                                                                  retry_after_s=60,
                                                                  policy="always")))
    cache = PredictionCache(redis_store(dead), config.value.cache)
    with _make_client(counting, config, cache) as client:
        x = _rows(2, seed=10)
        first, second = _infer(client, x), _infer(client, x)
        state = client.get("/v1/cache").json()
    assert first.status_code == second.status_code == 200
    assert first.headers["x-keel-cache"] == "miss"
    assert second.headers["x-keel-cache"] == "hit"  # from the in-process fallback
    assert counting.rows_seen == [2]
    assert state["remote"] == "down" and state["errors"] >= 1
    assert {k: state["models"]["linear"][k] for k in ("hits", "misses", "shared", "hit_ratio")
            } == {"hits": 2, "misses": 2, "shared": 0, "hit_ratio": 0.5}
    assert state["models"]["linear"]["policy"] == "always"


def test_decide_without_a_feature_store_is_503_and_checks_the_model_first(
        client: TestClient) -> None:
    body = {"model": "linear", "entities": [{"symbol": "SYM001"}]}
    answer = client.post("/v1/decide", json=body)
    assert answer.status_code == 503 and "no feature store" in answer.json()["error"]
    fixed = client.post("/v1/decide", json={**body, "model": "fixed"})
    assert fixed.status_code == 400 and "[-1, n_features]" in fixed.json()["error"]
    unknown = client.post("/v1/decide", json={**body, "model": "nope"})
    assert unknown.status_code == 404 and "'nope'" in unknown.json()["error"]
    state = client.get("/v1/cache").json()
    assert state["enabled"] is False and state["remote"] is None


def test_auto_policy_skips_the_cache_for_a_model_cheaper_than_a_lookup(
        counting: CountingModels, prefix: str) -> None:
    """The in-process linear model answers in microseconds, a Redis MGET costs more: under
    ``auto`` its rows stop going through the cache once both costs are measured, and one
    request per probe interval measures the lookup again."""
    config = MutableIngressConfig(IngressConfig(cache=CacheConfig(key_prefix=prefix,
                                                                  probe_interval_s=3600)))
    cache = PredictionCache(redis_store(REDIS_URL), config.value.cache)
    with _make_client(counting, config, cache) as client:
        statuses = [_infer(client, _rows(1, seed=100 + i)).headers["x-keel-cache"]
                    for i in range(20)]
        state = client.get("/v1/cache").json()["models"]["linear"]
    assert statuses[0] == "miss"  # the lookup's cost is unknown until measured once
    assert statuses[-10:] == ["off"] * 10
    assert state["policy"] == "auto" and state["in_use"] is False
    assert state["lookup_ms"] > state["compute_ms"] > 0
    never = CacheConfig(key_prefix=prefix, policy="always", models={"linear": "never"})
    config.value = IngressConfig(cache=never)
    cache.reconfigure(never)
    with _make_client(counting, config, cache) as client:
        assert _infer(client, _rows(1, seed=1)).headers["x-keel-cache"] == "off"


def test_the_write_back_lands_after_the_answer_under_the_version_that_computed_it(
        counting: CountingModels, prefix: str) -> None:
    """A version swap between the answer and its (delayed) write-back never stores one
    version's rows under the other's key: keys are made before the model is called, with
    the version the call is pinned to."""
    config = MutableIngressConfig(IngressConfig(cache=CacheConfig(key_prefix=prefix,
                                                                  policy="always")))
    cache = PredictionCache(redis_store(REDIS_URL), config.value.cache)
    x = _rows(2, seed=11)
    sync = redis.Redis.from_url(REDIS_URL)
    try:
        with _make_client(counting, config, cache) as client:
            answer = _infer(client, x)  # version 1 computes; its write-back is queued
            counting.apply("linear", OnnxModelConfig(version="2"))
            client.app.state.plane.catalog.forget()
            keys_v1 = cache.keys("linear", "1", {"features": x})
            keys_v2 = cache.keys("linear", "2", {"features": x})
            stored = _eventually(lambda: all(sync.exists(k) for k in keys_v1))
            assert stored, "the write-back after the answer never landed"
            assert sync.exists(*keys_v2) == 0
            v1 = np.stack([decode_row(sync.get(k))["probabilities"] for k in keys_v1])
            np.testing.assert_array_equal(v1, _probabilities(answer))
            bumped = _infer(client, x)
            assert bumped.json()["model_version"] == "2"
            assert bumped.headers["x-keel-cache"] == "miss"
            np.testing.assert_allclose(_probabilities(bumped),
                                       reference_probabilities(x, seed=1), atol=ATOL)
            assert _eventually(lambda: all(sync.exists(k) for k in keys_v2))
            v2 = np.stack([decode_row(sync.get(k))["probabilities"] for k in keys_v2])
            np.testing.assert_array_equal(v2, _probabilities(bumped))
            assert _eventually(lambda: cache.background.counts()["done"].get("cache_write", 0)
                               >= 2)
    finally:
        sync.close()
