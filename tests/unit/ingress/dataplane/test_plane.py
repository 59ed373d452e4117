"""The ingress's data plane without HTTP or Ray: real ONNX models (in the plane and behind
a backend), a real Feast store (the embedded default), the real prediction cache."""

from __future__ import annotations

import asyncio
import json
import pickle
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from deployments.cache.core import PredictionCache
from deployments.contracts import InferCall, InferResult, ModelStatus
from deployments.errors import (
    DependencyUnavailable,
    EntityNotFound,
    InvalidInput,
    KeelError,
    ModelNotFound,
)
from deployments.features.core import FeatureFetcher, FeatureRows
from deployments.features.rowcache import FeatureCacheConfig, FeatureRowCache
from deployments.ingress.dataplane import catalog as catalog_module
from deployments.ingress.dataplane.config import IngressConfig
from deployments.ingress.dataplane.decide import decision_input
from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.pool.placement import EmbeddedModels, ModelPool
from deployments.observability.events import ServingObserver
from deployments.onnx.core import OnnxModelConfig
from deployments.repository import ModelRepository
from graph.demo.dataset import ACCOUNT_KEY, SYMBOL_KEY
from tests.support.feature_data import ACCOUNTS, SMALL, SYMBOLS
from tests.support.inprocess import InProcessModels, MutableIngressConfig
from tests.support.modelkit import reference_probabilities
from tests.support.serve_app import copy_feature_repo

ATOL = 1e-5


class RemoteModels(InProcessModels):
    """Models reached through a backend (as through a handle): counts its calls."""

    def __init__(self, repository: ModelRepository, names: list[str],
                 delay_s: float = 0.0) -> None:
        super().__init__(repository)
        self.versions = {n: v for n, v in self.versions.items() if n in names}
        self.calls: list[int] = []
        self.delay_s = delay_s

    async def infer_many(self, name: str, calls: list[InferCall]
                         ) -> Sequence[InferResult | KeelError]:
        self.calls.append(len(calls))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await super().infer_many(name, calls)


class InProcessFeatures:
    """The FeatureService's work without Ray: a real FeatureFetcher, counting calls."""

    def __init__(self, fetcher: FeatureFetcher) -> None:
        self.fetcher = fetcher
        self.calls: list[int] = []

    async def lookup_many(self, lookups: list[tuple[list[dict[str, Any]], list[str]]],
                          traces: list[dict[str, str] | None]
                          ) -> Sequence[FeatureRows | KeelError]:
        self.calls.append(len(lookups))
        await asyncio.sleep(0)  # a real hop yields; let concurrent requests queue meanwhile
        return self.fetcher.lookup_many(lookups)


def _body(x: np.ndarray, **extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "features", "shape": list(x.shape),
                                   "datatype": "FP32", "data": x.reshape(-1).tolist()}],
                       **extra}).encode()


def _probabilities(body: bytes) -> np.ndarray:
    [out] = [o for o in json.loads(body)["outputs"] if o["name"] == "probabilities"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


@pytest.fixture
def pool(repository: ModelRepository) -> tuple[ModelPool, EmbeddedModels, RemoteModels]:
    embedded = EmbeddedModels(repository, ["linear"])
    embedded.apply({"linear": OnnxModelConfig(version="1")})
    remote = RemoteModels(repository, ["nanok", "fixed"])
    return ModelPool(embedded, remote), embedded, remote


@pytest.fixture
def plane(pool: tuple[ModelPool, EmbeddedModels, RemoteModels]) -> DataPlane:
    return DataPlane(pool[0], MutableIngressConfig())


async def test_infer_on_bytes_answers_what_the_model_computes(plane: DataPlane) -> None:
    x = _rows(3, seed=1)
    answer = await plane.inference.infer("linear", None, _body(x, id="r-1"), None)
    assert answer.version == "1" and answer.cache == "off" and answer.json_length is None
    assert json.loads(answer.body)["id"] == "r-1"
    np.testing.assert_allclose(_probabilities(answer.body), reference_probabilities(x, seed=0),
                               atol=ATOL)


@pytest.mark.parametrize(("model", "seed"), [("linear", 0), ("nanok", 2)])
async def test_concurrent_requests_reach_the_model_in_one_call_each_with_its_own_rows(
        pool: tuple[ModelPool, EmbeddedModels, RemoteModels], plane: DataPlane,
        model: str, seed: int) -> None:
    models, _, remote = pool
    xs = [_rows(1 + i % 3, seed=10 + i) for i in range(16)]
    answers = await asyncio.gather(*(plane.inference.infer(model, None, _body(x), None)
                                     for x in xs))
    for x, answer in zip(xs, answers, strict=True):
        np.testing.assert_allclose(_probabilities(answer.body),
                                   reference_probabilities(x, seed=seed), atol=ATOL)
    stats = models.batch_stats(model)
    assert stats["items"] == 16 and stats["batches"] == 1
    if model == "nanok":
        assert remote.calls == [16]  # ONE backend (handle) call for sixteen requests


class HungStatus(RemoteModels):
    """Remote models whose status calls can be made to hang (a status call that went to
    a stopped replica) while inference keeps answering (from the other replicas)."""

    def __init__(self, repository: ModelRepository, names: list[str]) -> None:
        super().__init__(repository, names)
        self.status_calls = 0
        self.answer_status = asyncio.Event()
        self.answer_status.set()

    async def status(self, name: str) -> ModelStatus:
        self.status_calls += 1
        await self.answer_status.wait()
        return await super().status(name)


def _hung_status_plane(repository: ModelRepository, ttl_s: float
                       ) -> tuple[DataPlane, HungStatus]:
    remote = HungStatus(repository, ["nanok"])
    embedded = EmbeddedModels(repository, ["linear"])
    embedded.apply({"linear": OnnxModelConfig(version="1")})
    plane = DataPlane(ModelPool(embedded, remote),
                      MutableIngressConfig(IngressConfig(status_ttl_s=ttl_s)))
    return plane, remote


async def test_a_status_refresh_that_hangs_delays_no_request_holding_a_copy(
        repository: ModelRepository) -> None:
    plane, remote = _hung_status_plane(repository, ttl_s=0.05)
    x = _rows(1, seed=3)
    await plane.inference.infer("nanok", None, _body(x), None)  # the first status, fetched
    assert remote.status_calls == 1
    remote.answer_status.clear()  # from now on a status call hangs
    await asyncio.sleep(0.1)  # past status_ttl_s
    began = asyncio.get_running_loop().time()
    answers = await asyncio.wait_for(asyncio.gather(*(
        plane.inference.infer("nanok", None, _body(x), None) for _ in range(20))), 5)
    # They waited for the refresh only while it was young (STALE_WAIT_S), then used the copy
    assert asyncio.get_running_loop().time() - began < catalog_module.STALE_WAIT_S + 0.5
    assert {a.version for a in answers} == {"1"}
    assert remote.status_calls == 2  # ONE refresh in the background, not one per request
    await asyncio.sleep(0.1)
    await asyncio.wait_for(plane.inference.infer("nanok", None, _body(x), None), 5)
    assert remote.status_calls == 2  # still that one, still hung: nobody waits for it
    remote.answer_status.set()
    await asyncio.sleep(0.05)
    assert plane.catalog.held("nanok") is not None
    assert "nanok" not in plane.catalog._refreshing  # done; the next refresh is a new one


async def test_a_copy_past_its_ttl_is_not_used_while_the_model_answers_its_status(
        repository: ModelRepository) -> None:
    """A split changed by a deploy applies within status_ttl_s, however long the ingress
    was idle: the first request after the TTL waits for the (prompt) refresh instead of
    routing by the old copy (a serve test once got version 2 right after a deploy back
    to version 1, from a copy held since the previous test)."""
    remote = HungStatus(repository, ["linear"])
    remote.apply("linear", OnnxModelConfig(traffic={"1": 0, "2": 100}))
    plane = DataPlane(ModelPool(None, remote),
                      MutableIngressConfig(IngressConfig(status_ttl_s=0.05)))
    x = _rows(1, seed=5)
    assert (await plane.inference.infer("linear", None, _body(x), None)).version == "2"
    remote.apply("linear", OnnxModelConfig(version="1"))  # the deploy back (2 stays loaded)
    await asyncio.sleep(0.1)  # idle past the TTL
    assert (await plane.inference.infer("linear", None, _body(x), None)).version == "1"
    assert remote.status_calls == 2


async def test_a_first_status_that_never_comes_is_a_503_with_retry_after(
        repository: ModelRepository, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_module, "STATUS_TIMEOUT_S", 0.2)
    plane, remote = _hung_status_plane(repository, ttl_s=1.0)
    remote.answer_status.clear()
    results = await asyncio.wait_for(asyncio.gather(*(
        plane.inference.infer("nanok", None, _body(_rows(1, seed=4)), None) for _ in range(5)),
        return_exceptions=True), 5)
    for result in results:
        assert isinstance(result, DependencyUnavailable), result
        assert result.retry_after_s == 1
        assert "model 'nanok' did not answer a status call within 0.2 s" in result.message
    assert remote.status_calls == 1  # the five requests waited on one call
    remote.answer_status.set()
    answer = await plane.inference.infer("nanok", None, _body(_rows(1, seed=4)), None)
    assert answer.version == "1"  # answered once the model answers again


async def test_a_fresh_status_is_fetched_even_while_a_refresh_runs(
        repository: ModelRepository) -> None:
    plane, remote = _hung_status_plane(repository, ttl_s=0.05)
    await plane.catalog.status("nanok")
    remote.answer_status.clear()
    await asyncio.sleep(0.1)
    await plane.catalog.status("nanok")  # starts a background refresh, which hangs
    fresh = asyncio.ensure_future(plane.catalog.status("nanok", fresh=True))
    await asyncio.sleep(0.05)
    assert remote.status_calls == 3 and not fresh.done()  # its own call
    remote.answer_status.set()
    assert (await fresh).served_version == "1"


async def test_a_bad_call_in_a_coalesced_batch_fails_alone(
        pool: tuple[ModelPool, EmbeddedModels, RemoteModels]) -> None:
    models, _, _ = pool
    x = _rows(1, seed=3)
    good = [InferCall(inputs={"features": x}) for _ in range(3)]
    bad = InferCall(inputs={"features": x}, version="9")  # not loaded: that call's own error
    results = await asyncio.gather(*(models.infer("linear", c) for c in [good[0], bad, *good[1:]]),
                                   return_exceptions=True)
    assert isinstance(results[1], ModelNotFound) and "'9'" in results[1].message
    assert all(isinstance(r, InferResult) and r.model_version == "1"
               for r in results[:1] + results[2:])
    assert models.batch_stats("linear")["batches"] == 1


async def test_a_timed_out_or_cancelled_request_fails_alone(
        repository: ModelRepository) -> None:
    remote = RemoteModels(repository, ["linear"], delay_s=0.3)
    remote.apply("linear", OnnxModelConfig(version="1"))
    plane = DataPlane(ModelPool(None, remote, max_in_flight=lambda: 1),
                      MutableIngressConfig(IngressConfig(request_timeout_s=5)))
    x = _rows(1, seed=4)
    blocker = asyncio.create_task(plane.inference.infer("linear", None, _body(x), None))
    await asyncio.sleep(0.05)  # the others queue behind the first call and leave together
    kept = asyncio.create_task(plane.inference.infer("linear", None, _body(x), None))
    cancelled = asyncio.create_task(plane.inference.infer("linear", None, _body(x), None))
    timed_out = asyncio.create_task(asyncio.wait_for(
        plane.inference.infer("linear", None, _body(x), None), 0.35))
    await asyncio.sleep(0.1)
    cancelled.cancel()
    with pytest.raises(TimeoutError):
        await timed_out
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    for task in (blocker, kept):
        np.testing.assert_allclose(_probabilities((await task).body),
                                   reference_probabilities(x, seed=0), atol=ATOL)
    assert remote.calls == [1, 2]  # the cancelled one left the queue before its batch did


async def test_ingress_models_swap_versions_live_and_pins_keep_working(
        pool: tuple[ModelPool, EmbeddedModels, RemoteModels], plane: DataPlane) -> None:
    _, embedded, _ = pool
    x = _rows(2, seed=5)
    embedded.apply({"linear": OnnxModelConfig(version="2")})
    plane.catalog.forget()
    answer = await plane.inference.infer("linear", None, _body(x), None)
    assert answer.version == "2"
    np.testing.assert_allclose(_probabilities(answer.body), reference_probabilities(x, seed=1),
                               atol=ATOL)
    pinned = await plane.inference.infer("linear", "1", _body(x), None)
    assert pinned.version == "1"  # the replaced version stays loaded for pinned requests
    embedded.apply({"linear": OnnxModelConfig(version="2"), "nanok": OnnxModelConfig()})
    with pytest.raises(KeelError, match=r"\['typo'\] are not in the model repository"):
        embedded.apply({"typo": OnnxModelConfig()})


async def test_readiness_waits_for_the_warm_up(pool: tuple[ModelPool, EmbeddedModels,
                                                           RemoteModels]) -> None:
    gate = asyncio.Event()

    async def warm_up() -> None:
        await gate.wait()

    plane = DataPlane(pool[0], MutableIngressConfig(IngressConfig(ready_timeout_s=0.1)),
                      warm_up=warm_up)
    plane.start_warming()
    ready, body = await plane.ready()
    assert not ready and body["warming"] is True
    assert body["models"]["linear"] == {"ready": True, "version": "1", "placement": "ingress"}
    assert body["models"]["nanok"]["placement"] == "deployment"
    gate.set()
    ready, body = await plane.ready()
    assert ready and "warming" not in body


# --- /v1/decide over a real Feast store -------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FeatureFetcher]:
    """The demo models and Feast repository, small."""
    from graph.demo.build import build_demo_repository
    from graph.demo.feast_store import prepare_feature_store

    models = tmp_path_factory.mktemp("models")
    build_demo_repository(models, config=SMALL)
    repo = copy_feature_repo(tmp_path_factory.mktemp("feast") / "repo")
    prepare_feature_store(repo, SMALL)
    return models, FeatureFetcher(repo)


def _decide_plane(demo: tuple[Path, FeatureFetcher], staleness_s: float
                  ) -> tuple[DataPlane, InProcessFeatures]:
    models, fetcher = demo
    embedded = EmbeddedModels(ModelRepository(models), ["risk_mlp"])
    embedded.apply({})
    features = InProcessFeatures(fetcher)
    config = IngressConfig(features=FeatureCacheConfig(max_staleness_s=staleness_s))
    return DataPlane(ModelPool(embedded, None), MutableIngressConfig(config),
                     features=features), features


def _entities(n: int, offset: int = 0) -> list[dict[str, str]]:
    return [{SYMBOL_KEY: SYMBOLS[(offset + i) % len(SYMBOLS)],
             ACCOUNT_KEY: ACCOUNTS[(offset + 3 * i) % len(ACCOUNTS)]} for i in range(n)]


def _expected(demo: tuple[Path, FeatureFetcher], entities: list[dict[str, str]]) -> np.ndarray:
    models, fetcher = demo
    from deployments.ingress.dataplane.decide import decision_input

    spec = ModelRepository(models).spec("risk_mlp")
    rows = fetcher.lookup(entities, list(decision_input(spec).columns or []))
    session = ort.InferenceSession(str(models / "risk_mlp" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return np.array([session.run(["probabilities"], {"features": rows.values[i:i + 1]})[0][0, 1]
                     for i in range(len(entities))])


async def test_decide_scores_entities_and_reuses_fresh_feature_rows(
        demo: tuple[Path, FeatureFetcher]) -> None:
    plane, features = _decide_plane(demo, staleness_s=60)
    items = _entities(4)
    body = json.dumps({"model": "risk_mlp", "entities": items}).encode()
    first = json.loads((await plane.decisions.decide(body)).body)
    assert [r["entity"] for r in first["results"]] == items
    np.testing.assert_allclose([r["score"] for r in first["results"]], _expected(demo, items),
                               rtol=1e-5)
    assert features.calls == [1]
    second = json.loads((await plane.decisions.decide(body)).body)
    assert features.calls == [1], "fresh rows must not go back to the store"
    assert [r["score"] for r in second["results"]] == [r["score"] for r in first["results"]]
    # Two held, two new: only the new ones are looked up, order kept.
    mixed = _entities(2) + _entities(2, offset=3)
    third = json.loads((await plane.decisions.decide(json.dumps(
        {"model": "risk_mlp", "entities": mixed}).encode())).body)
    np.testing.assert_allclose([r["score"] for r in third["results"]], _expected(demo, mixed),
                               rtol=1e-5)
    assert plane.admin.cache_state()["feature_rows"]["hits"] == 6


async def test_a_sampled_decision_is_logged_with_its_entities_and_features(
        demo: tuple[Path, FeatureFetcher]) -> None:
    """/v1/decide's payload record: the entity keys, the feature row the model scored
    (as the model input) and its probabilities, in the real Redis Stream."""
    import uuid

    import redis

    from deployments.cache.core import PredictionCache
    from deployments.cache.policy import CacheConfig
    from deployments.ingress.rollout.payload_log import PayloadLogConfig
    from deployments.storage.remote import redis_store

    models, fetcher = demo
    embedded = EmbeddedModels(ModelRepository(models), ["risk_mlp"])
    embedded.apply({})
    stream = f"keel-test:payloads:{uuid.uuid4().hex[:8]}"
    remote = redis_store("redis://127.0.0.1:6379/0")
    config = IngressConfig(payloads=PayloadLogConfig(rate=1.0, stream=stream))
    plane = DataPlane(ModelPool(embedded, None), MutableIngressConfig(config),
                      features=InProcessFeatures(fetcher), redis=remote,
                      cache=PredictionCache(remote, CacheConfig(
                          key_prefix=f"keel-test:{uuid.uuid4().hex[:8]}:")))
    items = _entities(3)
    answer = json.loads((await plane.decisions.decide(json.dumps(
        {"model": "risk_mlp", "entities": items}).encode())).body)
    await plane.payloads.settled()
    with redis.Redis.from_url("redis://127.0.0.1:6379/0") as client:
        [(_, fields)] = client.xrange(stream)
        client.delete(stream)
    data = json.loads(fields[b"event"])["data"]
    assert (data["endpoint"], data["model"], data["version"]) == ("decide", "risk_mlp", "1")
    assert data["entities"] == items and data["rows"] == 3
    columns = list(decision_input(ModelRepository(models).spec("risk_mlp")).columns or [])
    np.testing.assert_allclose(data["inputs"]["features"],
                               fetcher.lookup(items, columns).values, rtol=1e-6)
    np.testing.assert_allclose([p[1] for p in data["outputs"]["probabilities"]],
                               [r["score"] for r in answer["results"]], rtol=1e-6)
    await plane.cache.settled()  # type: ignore[union-attr]
    await remote.client.aclose()


async def test_the_drift_gauge_moves_when_the_load_shifts_a_feature(
        demo: tuple[Path, FeatureFetcher]) -> None:
    """Logged inputs (payloads.rate) against the deciles `keel prepare` wrote into
    risk_mlp's model.yaml: training-like rows keep every feature's PSI low; the same rows
    with one feature moved by three standard deviations push that feature's PSI past the
    alert's 0.25, and only that one. No Redis needed: drift is computed in the ingress."""
    from deployments.ingress.rollout.payload_log import PayloadLogConfig
    from graph.demo.dataset import FEATURE_REFS, generate, training_matrix

    models, _ = demo
    embedded = EmbeddedModels(ModelRepository(models), ["risk_mlp"])
    embedded.apply({})
    seen: dict[str, float] = {}

    class Gauge(ServingObserver):
        def feature_drift(self, model: str, version: str, feature: str, value: float) -> None:
            assert (model, version) == ("risk_mlp", "1")
            seen[feature] = value

    config = IngressConfig(payloads=PayloadLogConfig(rate=1.0, drift_window=400))
    plane = DataPlane(ModelPool(embedded, None), MutableIngressConfig(config),
                      observer=Gauge())
    x = training_matrix(generate(SMALL))[0].astype(np.float32)
    rng = np.random.default_rng(11)

    async def load(rows: np.ndarray) -> None:
        for start in range(0, len(rows), 20):
            block = rows[start:start + 20]
            body = json.dumps({"inputs": [{"name": "features", "shape": list(block.shape),
                                           "datatype": "FP32",
                                           "data": block.reshape(-1).tolist()}]}).encode()
            await plane.inference.infer("risk_mlp", None, body, None)

    await load(x[rng.choice(len(x), 400)])
    assert sorted(seen) == sorted(FEATURE_REFS)
    assert max(seen.values()) < 0.1, seen
    moved = FEATURE_REFS.index("market_features:ret_5d")
    shifted = x[rng.choice(len(x), 400)].copy()
    shifted[:, moved] += 3 * x[:, moved].std()
    await load(shifted)
    assert seen["market_features:ret_5d"] > 0.25, seen
    assert max(v for k, v in seen.items() if k != "market_features:ret_5d") < 0.1, seen
    state = plane.drift.state()["risk_mlp"]["1"]
    assert state["rows"] == 400 and state["psi"]["market_features:ret_5d"] > 0.25
    assert plane.payloads.state()["dropped"]["no_redis"] == 40  # no Redis: none logged


async def test_decide_with_staleness_zero_always_asks_the_store(
        demo: tuple[Path, FeatureFetcher]) -> None:
    plane, features = _decide_plane(demo, staleness_s=0)
    body = json.dumps({"model": "risk_mlp", "entities": _entities(2)}).encode()
    for _ in range(3):
        await plane.decisions.decide(body)
    assert features.calls == [1, 1, 1] and len(plane.feature_rows) == 0


async def test_concurrent_decisions_share_one_lookup_and_an_unknown_entity_fails_alone(
        demo: tuple[Path, FeatureFetcher]) -> None:
    plane, features = _decide_plane(demo, staleness_s=0)
    good = [json.dumps({"model": "risk_mlp", "entities": _entities(1, offset=i)}).encode()
            for i in range(6)]
    unknown = json.dumps({"model": "risk_mlp",
                          "entities": [{SYMBOL_KEY: "NOPE", ACCOUNT_KEY: ACCOUNTS[0]}]}).encode()
    results = await asyncio.gather(*(plane.decisions.decide(b)
                                     for b in [*good[:3], unknown, *good[3:]]),
                                   return_exceptions=True)
    assert isinstance(results[3], EntityNotFound) and "NOPE" in results[3].message
    assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 3)
    assert features.calls == [7]  # seven requests, one lookup


async def test_decide_bad_input_names_the_field(demo: tuple[Path, FeatureFetcher]) -> None:
    plane, features = _decide_plane(demo, staleness_s=60)
    for body, field in ((b'{"model": "risk_mlp"}', "entities"),
                        (b'{"model": "risk_mlp", "entities": [1]}', "entities.0"),
                        (b"not json", "JSON")):
        with pytest.raises(InvalidInput, match=field):
            await plane.decisions.decide(body)
    assert features.calls == []


def test_the_feature_row_cache_honours_its_staleness_bound() -> None:
    now = [1000.0]
    cache = FeatureRowCache(FeatureCacheConfig(max_staleness_s=5, max_entries=2),
                            clock=lambda: now[0])
    entities = [{"k": "a"}, {"k": "b"}]
    rows = FeatureRows(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
                       {"view": [10.0, 20.0]})
    cache.keep(entities, ["f1", "f2"], rows)
    found, missing = cache.split(entities, ["f1", "f2"])
    assert missing == [] and found[1] is not None and found[1].values.tolist() == [3.0, 4.0]
    assert cache.split(entities, ["f2", "f1"])[1] == [0, 1]  # another feature list
    now[0] += 5.01
    assert cache.split(entities, ["f1", "f2"])[1] == [0, 1]  # older than the bound
    cache.keep([{"k": "c"}], ["f1", "f2"], FeatureRows(np.ones((1, 2), np.float32), {}))
    assert len(cache) == 2  # the LRU bound
    assert cache.split([{"k": ["unhashable"]}], ["f1"])[1] == [0]
    cache.reconfigure(FeatureCacheConfig(max_staleness_s=0))
    assert len(cache) == 0 and not cache.enabled


async def test_auto_cache_steps_aside_for_a_model_in_the_ingress(
        pool: tuple[ModelPool, EmbeddedModels, RemoteModels]) -> None:
    """An in-ingress model's cost is its own ONNX Runtime run (not the wait in a busy loop):
    against a real Redis lookup it is cheaper, so its rows stop going through the cache.
    The costs are moving averages from measured times, and a cold first run can cost more
    than the lookups: within 200 requests the cache steps aside and stays aside."""
    import uuid

    from deployments.cache.core import PredictionCache
    from deployments.cache.policy import CacheConfig
    from deployments.storage.remote import redis_store

    config = IngressConfig(cache=CacheConfig(key_prefix=f"keel-test:{uuid.uuid4().hex[:8]}:",
                                             probe_interval_s=3600))
    cache = PredictionCache(redis_store("redis://127.0.0.1:6379/0"), config.cache)
    plane = DataPlane(pool[0], MutableIngressConfig(config), cache=cache)
    answers = []
    for i in range(200):
        answers.append(await plane.inference.infer("linear", None,
                                                   _body(_rows(1, seed=200 + i)), None))
        if [a.cache for a in answers[-10:]] == ["off"] * 10:
            break
    assert answers[0].cache == "miss"  # costs unknown: measured once
    assert [a.cache for a in answers[-10:]] == ["off"] * 10, Counter(a.cache for a in answers)
    state = plane.admin.cache_state()["models"]["linear"]
    assert state["in_use"] is False and state["compute_ms"] < state["lookup_ms"]
    await cache.settled()
    await cache.store.remote.client.aclose()  # type: ignore[union-attr]


# --- traffic splits between versions ----------------------------------------------------


def _split_plane(pool: tuple[ModelPool, EmbeddedModels, RemoteModels],
                 traffic: dict[str, float], cache: PredictionCache | None = None) -> DataPlane:
    """``linear`` split by ``traffic``; the status held for a minute (no refresh unless
    something forces it)."""
    models, embedded, _ = pool
    embedded.apply({"linear": OnnxModelConfig(traffic=traffic)})
    config = IngressConfig(status_ttl_s=60, **({"cache": cache.config} if cache else {}))
    return DataPlane(models, MutableIngressConfig(config), cache=cache)


async def test_a_split_sends_keys_to_versions_by_weight_and_each_answer_is_its_versions(
        pool: tuple[ModelPool, EmbeddedModels, RemoteModels]) -> None:
    plane = _split_plane(pool, {"1": 70, "2": 30})
    x = _rows(1, seed=40)
    references = {"1": reference_probabilities(x, seed=0), "2": reference_probabilities(x, seed=1)}
    answers = await asyncio.gather(*(plane.inference.infer("linear", None, _body(x), None,
                                                           f"acct-{i}")
                                     for i in range(1200)))
    counts = Counter(a.version for a in answers)
    assert 0.25 < counts["2"] / 1200 < 0.35, counts
    for answer in answers:
        np.testing.assert_allclose(_probabilities(answer.body), references[answer.version],
                                   atol=ATOL)
    # Sticky: a key keeps its version; a pinned version overrides the split.
    for i in range(20):
        again = {(await plane.inference.infer("linear", None, _body(x), None, f"acct-{i}")).version
                 for _ in range(3)}
        assert again == {answers[i].version}
    pinned = await plane.inference.infer("linear", "2", _body(x), None, "acct-0")
    assert pinned.version == "2"
    np.testing.assert_allclose(_probabilities(pinned.body), references["2"], atol=ATOL)


async def test_the_cache_keeps_each_versions_rows_apart(
        pool: tuple[ModelPool, EmbeddedModels, RemoteModels]) -> None:
    """The version is chosen before keying: a row computed by 1 is never a hit for 2."""
    import uuid

    from deployments.cache.policy import CacheConfig
    from deployments.storage.remote import redis_store

    config = CacheConfig(key_prefix=f"keel-test:{uuid.uuid4().hex[:8]}:", policy="always")
    cache = PredictionCache(redis_store("redis://127.0.0.1:6379/0"), config)
    plane = _split_plane(pool, {"1": 50, "2": 50}, cache=cache)
    x = _rows(3, seed=41)
    seeds = {"1": 0, "2": 1}
    key_for: dict[str, str] = {}
    for i in range(200):  # the same rows under keys that land on 1 and on 2
        answer = await plane.inference.infer("linear", None, _body(x), None, f"k{i}")
        if answer.version in key_for:
            continue
        key_for[answer.version] = f"k{i}"
        # The first answer of each version is computed by it: the other's row is no hit.
        assert answer.cache == "miss", (answer.version, key_for)
        np.testing.assert_allclose(_probabilities(answer.body),
                                   reference_probabilities(x, seed=seeds[answer.version]),
                                   atol=ATOL)
        await cache.settled()
        if len(key_for) == 2:
            break
    assert sorted(key_for) == ["1", "2"]
    for version, key in key_for.items():
        answer = await plane.inference.infer("linear", None, _body(x), None, key)
        assert answer.version == version and answer.cache == "hit"
        np.testing.assert_allclose(_probabilities(answer.body),
                                   reference_probabilities(x, seed=seeds[version]), atol=ATOL)
    await cache.settled()
    await cache.store.remote.client.aclose()  # type: ignore[union-attr]


async def test_a_version_unloaded_under_a_stale_split_is_answered_by_the_served_one(
        pool: tuple[ModelPool, EmbeddedModels, RemoteModels]) -> None:
    """Weights change while requests are in flight: this replica still holds the old split
    (status_ttl_s), chooses a version that is gone, and the request is answered anyway."""
    _, embedded, _ = pool
    plane = _split_plane(pool, {"1": 50, "2": 50})
    embedded.apply({"linear": OnnxModelConfig(traffic={"1": 50, "2": 50}, version="2")})
    x = _rows(1, seed=42)
    assert (await plane.catalog.status("linear")).traffic == {"1": 50, "2": 50}
    embedded.apply({"linear": OnnxModelConfig(version="2")})  # 1 unloaded, split gone
    answers = await asyncio.gather(*(plane.inference.infer("linear", None, _body(x), None, f"a{i}")
                                     for i in range(40)))
    assert {a.version for a in answers} == {"2"}
    assert (await plane.catalog.status("linear")).traffic == {}  # refreshed on the way
    with pytest.raises(ModelNotFound, match="'1'"):  # pinned by the client: its own error
        await plane.inference.infer("linear", "1", _body(x), None)


async def test_decide_routes_each_entity_stickily_and_a_mixed_answer_says_so(
        demo: tuple[Path, FeatureFetcher], tmp_path: Path) -> None:
    import shutil

    _, fetcher = demo
    models = tmp_path / "models"  # the demo's risk_mlp as versions 1 and 2
    shutil.copytree(demo[0] / "risk_mlp" / "1", models / "risk_mlp" / "1")
    shutil.copytree(demo[0] / "risk_mlp" / "1", models / "risk_mlp" / "2")
    repository = ModelRepository(models)
    embedded = EmbeddedModels(repository, ["risk_mlp"])
    embedded.apply({"risk_mlp": OnnxModelConfig(traffic={"1": 50, "2": 50})})
    plane = DataPlane(ModelPool(embedded, None), MutableIngressConfig(),
                      features=InProcessFeatures(fetcher))
    items = _entities(12)
    body = json.dumps({"model": "risk_mlp", "entities": items}).encode()
    first = json.loads((await plane.decisions.decide(body)).body)
    versions = [r["model_version"] for r in first["results"]]
    assert set(versions) == {"1", "2"} and first["model_version"] == "mixed"
    for i, item in enumerate(items):  # alone, each entity gets the version it got in a batch
        alone = await plane.decisions.decide(json.dumps({"model": "risk_mlp",
                                               "entities": [item]}).encode())
        assert alone.version == versions[i]
    keyed = await plane.decisions.decide(body, route_key="one-account")
    assert keyed.version in ("1", "2")  # one key for the whole request: one version
    pinned = json.loads((await plane.decisions.decide(json.dumps(
        {"model": "risk_mlp", "version": "2", "entities": items}).encode())).body)
    assert {r["model_version"] for r in pinned["results"]} == {"2"}


class RollingReplicas:
    """One model deployment's two replicas mid-rollout, as Serve reconfigures them one at a
    time: ``ahead`` already serves ``new`` (and keeps ``old`` loaded), ``behind`` still
    serves ``old``. The status comes from the one ahead; two calls in three go to the one
    behind (a retry can land on the same replica again, as with Serve's router)."""

    def __init__(self, repository: ModelRepository, name: str, old: str, new: str) -> None:
        self.name = name
        self.ahead = InProcessModels(repository, {name: OnnxModelConfig(version=old)})
        self.ahead.apply(name, OnnxModelConfig(version=new))
        self.behind = InProcessModels(repository, {name: OnnxModelConfig(version=old)})
        self.calls = Counter[str]()

    def model_names(self) -> list[str]:
        return [self.name]

    async def status(self, name: str) -> Any:
        return await self.ahead.status(name)

    async def infer_many(self, name: str, calls: list[InferCall]
                         ) -> Sequence[InferResult | KeelError]:
        replica = "ahead" if sum(self.calls.values()) % 3 == 2 else "behind"
        self.calls[replica] += 1
        answers = await getattr(self, replica).infer_many(name, calls)
        return pickle.loads(pickle.dumps(answers))  # across processes, as through a handle


@pytest.mark.parametrize("cached", [True, False])
async def test_replicas_that_disagree_on_the_served_version_fail_no_request(
        repository: ModelRepository, cached: bool) -> None:
    """Mid-rollout the ingress learns of version 2 from one replica and keys its cache with
    it; the replica still on 1 answers the unpinned request with its own version."""
    import uuid

    from deployments.cache.policy import CacheConfig
    from deployments.storage.remote import redis_store

    cache = PredictionCache(redis_store("redis://127.0.0.1:6379/0"), CacheConfig(
        key_prefix=f"keel-test:{uuid.uuid4().hex[:8]}:", policy="always")) if cached else None
    replicas = RollingReplicas(repository, "linear", old="1", new="2")
    config = IngressConfig(**({"cache": cache.config} if cache else {}))
    plane = DataPlane(ModelPool(None, replicas), MutableIngressConfig(config), cache=cache)
    references = {}
    for i in range(12):
        x = _rows(2, seed=60 + i)
        answer = await plane.inference.infer("linear", None, _body(x), None)
        references[answer.version] = True
        np.testing.assert_allclose(
            _probabilities(answer.body),
            reference_probabilities(x, seed={"1": 0, "2": 1}[answer.version]), atol=ATOL)
    assert replicas.calls["behind"] >= 8 and replicas.calls["ahead"] >= 4
    assert set(references) <= {"1", "2"}
    with pytest.raises(ModelNotFound, match="serving '1'"):  # a client's pin is not rerouted
        for _ in range(3):
            await plane.inference.infer("linear", "2", _body(_rows(1, seed=1)), None)
    if cache is not None:
        await cache.settled()
        await cache.store.remote.client.aclose()  # type: ignore[union-attr]


async def test_decisions_fail_no_request_while_replicas_disagree_on_the_version(
        demo: tuple[Path, FeatureFetcher], tmp_path: Path) -> None:
    import shutil

    _, fetcher = demo
    models = tmp_path / "models"  # the demo's risk_mlp as versions 1 and 2
    shutil.copytree(demo[0] / "risk_mlp" / "1", models / "risk_mlp" / "1")
    shutil.copytree(demo[0] / "risk_mlp" / "1", models / "risk_mlp" / "2")
    replicas = RollingReplicas(ModelRepository(models), "risk_mlp", old="1", new="2")
    plane = DataPlane(ModelPool(None, replicas), MutableIngressConfig(),
                      features=InProcessFeatures(fetcher))
    items = [_entities(1, offset=i)[0] for i in range(12)]
    expected = _expected(demo, items)
    for i, item in enumerate(items):
        body = json.dumps({"model": "risk_mlp", "entities": [item]}).encode()
        answer = json.loads((await plane.decisions.decide(body)).body)
        assert answer["model_version"] in ("1", "2")
        assert answer["results"][0]["score"] == pytest.approx(float(expected[i]), abs=ATOL)
    assert replicas.calls["behind"] >= 8


async def test_decisions_are_mirrored_to_the_shadow_per_entity_row(
        demo: tuple[Path, FeatureFetcher], tmp_path: Path) -> None:
    import shutil

    from deployments.contracts import Shadow

    models = tmp_path / "models"  # the demo's risk_mlp as versions 1 and 2 (the same model)
    shutil.copytree(demo[0] / "risk_mlp" / "1", models / "risk_mlp" / "1")
    shutil.copytree(demo[0] / "risk_mlp" / "1", models / "risk_mlp" / "2")
    embedded = EmbeddedModels(ModelRepository(models), ["risk_mlp"])
    embedded.apply({"risk_mlp": OnnxModelConfig(version="1", shadow=Shadow(version="2"))})
    plane = DataPlane(ModelPool(embedded, None), MutableIngressConfig(),
                      features=InProcessFeatures(demo[1]))
    body = json.dumps({"model": "risk_mlp", "entities": _entities(5)}).encode()
    answer = await plane.decisions.decide(body)
    assert answer.version == "1"
    await plane.decisions.decide(json.dumps({"model": "risk_mlp", "version": "1",
                                   "entities": _entities(3)}).encode())  # pinned: no copy
    await plane.shadow.settled()
    [comparison] = plane.shadow.state("risk_mlp")
    assert comparison["rows_compared"] == 5 and comparison["requests_compared"] == 1
    assert comparison["decision_flips"] == 0 and comparison["max_abs_difference"] == 0.0
