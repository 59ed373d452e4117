"""Shadow traffic: real ONNX models in the data plane, a copy of each unpinned answer sent
to the shadow version after the answer, compared row by row, never returned or cached."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from deployments.cache.core import PredictionCache
from deployments.cache.policy import CacheConfig
from deployments.contracts import InferCall, InferResult, Shadow
from deployments.errors import DependencyUnavailable, KeelError
from deployments.ingress.dataplane.config import IngressConfig
from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.pool.placement import EmbeddedModels, ModelPool
from deployments.ingress.rollout.shadow import compare
from deployments.onnx.core import OnnxModelConfig
from deployments.repository import ModelRepository
from deployments.storage.remote import redis_store
from tests.support.inprocess import InProcessModels, MutableIngressConfig
from tests.support.modelkit import reference_probabilities

ATOL = 1e-5


def _body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "features", "shape": list(x.shape),
                                   "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
                      ).encode()


def _probabilities(body: bytes) -> np.ndarray:
    [out] = [o for o in json.loads(body)["outputs"] if o["name"] == "probabilities"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


class GatedShadow(InProcessModels):
    """Real models behind a backend (as behind a handle) whose shadow calls wait for
    ``gate`` (a deliberately slow shadow) or fail (a broken one); live calls never wait."""

    def __init__(self, repository: ModelRepository, config: OnnxModelConfig,
                 fail: bool = False) -> None:
        super().__init__(repository, {"linear": config})
        self.versions = {"linear": self.versions["linear"]}
        self.gate = asyncio.Event()
        self.fail = fail
        self.aside_calls: list[int] = []

    async def infer_aside(self, name: str, calls: list[InferCall]
                          ) -> Sequence[InferResult | KeelError]:
        self.aside_calls.append(len(calls))
        await self.gate.wait()
        if self.fail:
            raise DependencyUnavailable("the shadow replica is gone")
        return await super().infer_aside(name, calls)


def _plane(models: ModelPool, *, shadow_queue: int = 1024,
           cache: PredictionCache | None = None) -> DataPlane:
    config = IngressConfig(status_ttl_s=60, shadow_queue=shadow_queue,
                           **({"cache": cache.config} if cache else {}))
    return DataPlane(models, MutableIngressConfig(config), cache=cache)


SHADOWED = OnnxModelConfig(version="1", shadow=Shadow(version="2"))


def _expected(xs: list[np.ndarray]) -> tuple[int, int, float]:
    """Rows, decision flips and the largest |score difference| of linear 1 against 2."""
    x = np.concatenate(xs)
    live = reference_probabilities(x, seed=0)[:, 1]
    shadow = reference_probabilities(x, seed=1)[:, 1]
    flips = int(np.count_nonzero((live >= 0.5) != (shadow >= 0.5)))
    return len(x), flips, float(np.abs(live - shadow).max())


async def test_every_unpinned_answer_is_mirrored_and_compared_exactly(
        repository: ModelRepository) -> None:
    embedded = EmbeddedModels(repository, ["linear"])
    embedded.apply({"linear": SHADOWED})
    plane = _plane(ModelPool(embedded, None))
    xs = [_rows(3, seed=100 + i) for i in range(40)]
    answers = await asyncio.gather(*(plane.inference.infer("linear", None, _body(x), None)
                                     for x in xs))
    for x, answer in zip(xs, answers, strict=True):  # the client hears the live version only
        assert answer.version == "1"
        np.testing.assert_allclose(_probabilities(answer.body),
                                   reference_probabilities(x, seed=0), atol=ATOL)
    for x in xs[:5]:  # pinned by the client: not mirrored
        await plane.inference.infer("linear", "1", _body(x), None)
    await plane.shadow.settled()
    rows, flips, largest = _expected(xs)
    [comparison] = plane.shadow.state("linear")
    assert comparison["version"] == "1" and comparison["shadow_version"] == "2"
    assert comparison["requests_compared"] == 40 and comparison["rows_compared"] == rows
    assert comparison["decision_flips"] == flips > 0
    assert comparison["flip_ratio"] == pytest.approx(flips / rows)
    assert comparison["max_abs_difference"] == pytest.approx(largest, abs=ATOL)
    assert comparison["dropped"] == {"queue_full": 0, "failed": 0}
    rollouts = await plane.admin.rollouts()
    assert rollouts["models"]["linear"]["shadow"] == {"version": "2", "fraction": 1.0}
    assert rollouts["models"]["linear"]["shares"] == {"1": 1.0}
    assert rollouts["models"]["linear"]["loaded_versions"] == ["1", "2"]


async def test_a_fraction_mirrors_about_that_share(repository: ModelRepository) -> None:
    embedded = EmbeddedModels(repository, ["linear"])
    embedded.apply({"linear": OnnxModelConfig(version="1",
                                              shadow=Shadow(version="2", fraction=0.25))})
    plane = _plane(ModelPool(embedded, None))
    x = _rows(1, seed=7)
    for _ in range(800):
        await plane.inference.infer("linear", None, _body(x), None)
    await plane.shadow.settled()
    [comparison] = plane.shadow.state("linear")
    assert 140 < comparison["requests_compared"] < 260, comparison


async def test_a_slow_shadow_never_holds_a_live_answer_and_a_full_queue_drops_copies(
        repository: ModelRepository) -> None:
    backend = GatedShadow(repository, SHADOWED)
    plane = _plane(ModelPool(None, backend), shadow_queue=4)
    xs = [_rows(2, seed=200 + i) for i in range(20)]
    answers = []
    for x in xs:  # every answer comes back while the shadow has not answered once
        answers.append(await plane.inference.infer("linear", None, _body(x), None))
    assert [a.version for a in answers] == ["1"] * 20
    for x, answer in zip(xs, answers, strict=True):
        np.testing.assert_allclose(_probabilities(answer.body),
                                   reference_probabilities(x, seed=0), atol=ATOL)
    [comparison] = plane.shadow.state("linear")
    assert comparison["rows_compared"] == 0 and backend.aside_calls
    backend.gate.set()
    await plane.shadow.settled()
    [comparison] = plane.shadow.state("linear")
    dropped = comparison["dropped"]["queue_full"]
    assert dropped > 0 and comparison["requests_compared"] + dropped == 20
    assert comparison["rows_compared"] == 2 * comparison["requests_compared"]
    assert sum(backend.aside_calls) == comparison["requests_compared"]


async def test_a_failing_shadow_fails_no_request_and_is_counted(
        repository: ModelRepository) -> None:
    backend = GatedShadow(repository, SHADOWED, fail=True)
    backend.gate.set()
    plane = _plane(ModelPool(None, backend))
    xs = [_rows(1, seed=300 + i) for i in range(12)]
    answers = await asyncio.gather(*(plane.inference.infer("linear", None, _body(x), None)
                                     for x in xs))
    assert {a.version for a in answers} == {"1"}
    await plane.shadow.settled()
    [comparison] = plane.shadow.state("linear")
    assert comparison["rows_compared"] == 0
    assert comparison["dropped"] == {"queue_full": 0, "failed": 12}


async def test_a_shadow_answer_is_never_cached(repository: ModelRepository) -> None:
    """With the cache on (real Redis): the shadow's rows are not stored under the live
    version, nor under its own (a request pinned to it computes them)."""
    cache = PredictionCache(redis_store("redis://127.0.0.1:6379/0"), CacheConfig(
        key_prefix=f"keel-test:{uuid.uuid4().hex[:8]}:", policy="always"))
    embedded = EmbeddedModels(repository, ["linear"])
    embedded.apply({"linear": SHADOWED})
    plane = _plane(ModelPool(embedded, None), cache=cache)
    x = _rows(4, seed=400)
    first = await plane.inference.infer("linear", None, _body(x), None)
    assert first.cache == "miss"
    await plane.shadow.settled()
    await cache.settled()
    again = await plane.inference.infer("linear", None, _body(x), None)
    assert again.version == "1" and again.cache == "hit"
    np.testing.assert_allclose(_probabilities(again.body), reference_probabilities(x, seed=0),
                               atol=ATOL)
    pinned = await plane.inference.infer("linear", "2", _body(x), None)
    assert pinned.cache == "miss"
    np.testing.assert_allclose(_probabilities(pinned.body), reference_probabilities(x, seed=1),
                               atol=ATOL)
    await plane.shadow.settled()
    [comparison] = plane.shadow.state("linear")
    assert comparison["requests_compared"] == 2  # the hit is mirrored too: live traffic
    await cache.settled()
    await cache.store.remote.client.aclose()  # type: ignore[union-attr]


def test_compare_reads_the_decision_rule_or_else_the_outputs(
        repository: ModelRepository) -> None:
    spec = repository.spec("linear", "1")
    live = {"probabilities": np.array([[0.9, 0.1], [0.3, 0.7], [0.45, 0.55]], np.float32)}
    shadow = {"probabilities": np.array([[0.8, 0.2], [0.6, 0.4], [0.4, 0.6]], np.float32)}
    differences, flips = compare(spec, spec, live, shadow)
    np.testing.assert_allclose(differences, [0.1, 0.3, 0.05], atol=1e-6)
    assert flips == 1  # row 1: 0.7 >= 0.5 live, 0.4 < 0.5 shadow
    plain = spec.model_copy(update={"decision": None})
    differences, flips = compare(plain, plain, live, shadow)  # arg-max classes
    np.testing.assert_allclose(differences, [0.1, 0.3, 0.05], atol=1e-6)
    assert flips == 1
    with pytest.raises(ValueError, match="no numeric output"):
        compare(plain, plain, live, {"other": shadow["probabilities"]})


@pytest.mark.parametrize("config, field", [
    ({"version": "1", "shadow": {"version": "1"}}, "shadow"),
    ({"traffic": {"1": 90, "2": 10}, "shadow": {"version": "2"}}, "shadow"),
    ({"shadow": {"version": "2", "fraction": 1.5}}, "shadow.fraction"),
    ({"shadow": {"version": "2", "fraction": -0.1}}, "shadow.fraction"),
    ({"shadow": {"version": ""}}, "shadow.version"),
    ({"shadow": {"version": "2", "rate": 1}}, "shadow.rate"),
])
def test_a_bad_shadow_is_refused_naming_the_field(config: dict[str, Any], field: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        OnnxModelConfig.model_validate(config)
    assert [".".join(str(p) for p in e["loc"]) for e in caught.value.errors()] == [field]


def test_a_shadow_that_is_served_or_missing_fails_the_load_and_changes_nothing(
        repository: ModelRepository) -> None:
    from deployments.errors import ConfigError
    from deployments.onnx.core import ModelVersions

    versions = ModelVersions(repository, "linear")
    versions.apply(OnnxModelConfig(version="1"))
    with pytest.raises(ConfigError, match=r"shadow: version '2' .* is the served version"):
        versions.apply(OnnxModelConfig(shadow=Shadow(version="2")))  # latest = 2 = served
    with pytest.raises(ConfigError, match=r"shadow: version '7' .* cannot be loaded"):
        versions.apply(OnnxModelConfig(version="1", shadow=Shadow(version="7")))
    assert versions.status().shadow is None and sorted(versions.loaded()) == ["1"]
    versions.apply(SHADOWED)
    status = versions.status()
    assert status.shadow == Shadow(version="2") and sorted(status.loaded) == ["1", "2"]
    assert status.served_version == "1" and status.traffic == {}
