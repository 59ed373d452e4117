"""``/v1/decide`` and the prediction cache on the real Ray Serve application.

The features come from a real Feast repository (SQLite online store, prepared by
the session fixture from the same seeded generator as the models); the cache is a
private redis-server that one test stops and starts again.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ray import serve

from tests.support.decisions import entities, expected_scores
from tests.support.redisserver import PrivateRedis
from tests.support.serve_app import APP_NAME, KeelApp

pytestmark = pytest.mark.slow


def decide(http: httpx.Client, model: str, items: list[dict[str, Any]],
           path: str = "/v1/decide", **extra: Any) -> httpx.Response:
    return http.post(path, json={"model": model, "entities": items, **extra})


def cache_state(http: httpx.Client) -> dict[str, Any]:
    return http.get("/v1/cache").json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", ["risk_mlp", "risk_gbdt", "risk_mlp_int8"])
def test_decide_scores_the_store_features_then_hits_the_cache(http: httpx.Client,
                                                               model_repo: Path,
                                                               model: str) -> None:
    items = entities(4, offset={"risk_mlp": 0, "risk_gbdt": 10, "risk_mlp_int8": 20}[model])
    first = decide(http, model, items)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["model"] == model and body["model_version"] == "1"
    assert [r["entity"] for r in body["results"]] == items
    scores = np.array([r["score"] for r in body["results"]])
    np.testing.assert_allclose(scores, expected_scores(model_repo, model, items),
                               rtol=1e-5, atol=1e-6)
    for result in body["results"]:
        assert result["decision"] is (result["score"] >= result["threshold"])
        assert result["model"] == model and result["model_version"] == "1"
        timings = result["timings_ms"]
        assert set(timings) == {"features", "cache", "model", "total"}
        assert 0 < timings["features"] <= timings["total"]
        assert 0 < timings["model"] <= timings["total"]
    state = cache_state(http)["models"][model]
    if model == "risk_mlp_int8":
        # The shipped "auto" policy on an in-ingress model: the cache is used only while a
        # lookup costs less than the model, which this machine measures, not the test.
        assert state["policy"] == "auto" and state["compute_ms"] is not None
        assert {r["cache"] for r in body["results"]} <= {"miss", "off"}
        return
    assert [r["cache"] for r in body["results"]] == ["miss"] * len(items)
    assert first.headers["x-keel-cache"] == "miss"

    second = decide(http, model, items)
    assert second.status_code == 200
    again = second.json()
    assert [r["cache"] for r in again["results"]] == ["hit"] * len(items)
    assert [r["score"] for r in again["results"]] == [r["score"] for r in body["results"]]
    assert again["timings_ms"]["model"] == 0
    assert second.headers["x-keel-cache"] == "hit"


def test_decide_batch_of_duplicates_and_mixed_hits(http: httpx.Client, model_repo: Path) -> None:
    known = entities(2, offset=30)
    decide(http, "risk_mlp", known[:1])
    items = [known[0], known[1], known[1], known[0]]
    answer = decide(http, "risk_mlp", items)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["cache"] for r in results] == ["hit", "miss", "miss", "hit"]
    assert answer.headers["x-keel-cache"] == "partial"
    np.testing.assert_allclose([r["score"] for r in results],
                               expected_scores(model_repo, "risk_mlp", items), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        ({"model": "risk_mlp", "entities": []}, 400, "entities"),
        ({"model": "risk_mlp", "entities": entities(257)}, 400, "at most 256"),
        ({"model": "nope", "entities": entities(1)}, 404, "'nope'"),
        ({"model": "risk_mlp", "entities": [{"symbol": "SYM001"}]}, 400,
         "entities[0].account_id"),
        ({"model": "risk_mlp", "entities": [{"symbol": 7, "account_id": "ACC0001"}]}, 400,
         "entities[0].symbol"),
        ({"model": "risk_mlp", "entities": [{"symbol": "SYM001", "account_id": "ACC0001",
                                             "desk": "x"}]}, 400, "desk"),
        ({"model": "risk_mlp", "entities": [{"symbol": "SYM001", "account_id": "ACC0001"},
                                            {"symbol": "SYM999", "account_id": "ACC0001"}]},
         404, "SYM999"),
        ({"model": "risk_mlp", "entities": ["SYM001"]}, 400, "entities.0"),
        ({"entities": entities(1)}, 400, "model"),
        ({"model": "risk_mlp", "entities": entities(1), "extra": 1}, 400, "extra"),
        ({"model": "risk_mlp", "version": "9", "entities": entities(1)}, 404, "'9'"),
        ({"model": "linear", "entities": entities(1)}, 400, "test_view"),
    ],
)
def test_bad_decide_requests_name_the_field(http: httpx.Client, body: dict[str, Any],
                                           status: int, names: str) -> None:
    answer = http.post("/v1/decide", json=body)
    assert answer.status_code == status, answer.text
    assert names in answer.json()["error"], answer.json()
    good = decide(http, "risk_mlp", entities(1, offset=40))
    assert good.status_code == 200


def test_malformed_json_is_400(http: httpx.Client) -> None:
    answer = http.post("/v1/decide", content=b'{"model": "risk_mlp", "entities": [',
                       headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "JSON" in answer.json()["error"]


def test_openapi_documents_the_decide_contract(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    decide_path = document["paths"]["/v1/decide"]["post"]
    request = decide_path["requestBody"]["content"]["application/json"]["schema"]
    assert request["title"] == "DecideRequest"
    assert set(request["properties"]) == {"model", "version", "entities"}
    schemas = document["components"]["schemas"]
    assert {"DecideResponse", "Decision", "DecideTimings"} <= set(schemas)


def test_concurrent_lookups_are_merged_into_one_feature_call(keel_app: KeelApp) -> None:
    handle = serve.get_deployment_handle("FeatureService", app_name=APP_NAME)
    before = handle.stats.remote().result(timeout_s=30)["batch_sizes"]

    def one(i: int) -> int:
        with httpx.Client(base_url=keel_app.base_url, timeout=60) as client:
            return decide(client, "risk_gbdt", entities(1, offset=100 + i)).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(48)))
    assert statuses == [200] * 48
    after = handle.stats.remote().result(timeout_s=30)["batch_sizes"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == 48
    assert max(new) > 1, f"no lookups merged: {new}"


def test_a_new_model_version_misses_then_hits(keel_app: KeelApp, http: httpx.Client,
                                              model_repo: Path) -> None:
    items = entities(3, offset=60)
    assert decide(http, "risk_mlp", items).status_code == 200
    assert decide(http, "risk_mlp", items).json()["results"][0]["cache"] == "hit"
    shutil.copytree(model_repo / "risk_mlp" / "1", model_repo / "risk_mlp" / "2")
    config = keel_app.modified()
    # risk_mlp runs in the ingress: its version is the Ingress's user_config.models.risk_mlp.
    models = keel_app.deployment("Ingress", config)["user_config"]["models"]
    models["risk_mlp"] = {**models["risk_mlp"], "version": "2"}
    keel_app.deploy(config)
    try:
        deadline = time.monotonic() + 30
        while http.get("/v2/models/risk_mlp").json()["parameters"]["served_version"] != "2":
            assert time.monotonic() < deadline, "version 2 was not served"
            time.sleep(0.2)
        time.sleep(1.2)  # past the ingress's status_ttl_s
        bumped = decide(http, "risk_mlp", items).json()
        assert bumped["model_version"] == "2"
        assert [r["cache"] for r in bumped["results"]] == ["miss"] * 3
        np.testing.assert_allclose([r["score"] for r in bumped["results"]],
                                   expected_scores(model_repo, "risk_mlp", items), rtol=1e-5,
                                   atol=1e-6)
        assert decide(http, "risk_mlp", items).json()["results"][0]["cache"] == "hit"
    finally:
        restore = keel_app.modified()
        pinned = keel_app.deployment("Ingress", restore)["user_config"]["models"]["risk_mlp"]
        pinned["version"] = "1"
        keel_app.deploy(restore)
        shutil.rmtree(model_repo / "risk_mlp" / "2")


def test_cache_ttl_is_live_and_expires(keel_app: KeelApp, http: httpx.Client) -> None:
    config = keel_app.modified()
    ingress = keel_app.deployment("Ingress", config)
    ingress["user_config"]["cache"] = {**ingress["user_config"]["cache"], "ttl_s": 1}
    keel_app.deploy(config)
    try:
        deadline = time.monotonic() + 30
        while cache_state(http)["config"]["ttl_s"] != 1:
            assert time.monotonic() < deadline, "the new TTL was not applied"
            time.sleep(0.2)
        items = entities(2, offset=70)
        assert decide(http, "risk_mlp", items).json()["results"][0]["cache"] == "miss"
        assert decide(http, "risk_mlp", items).json()["results"][0]["cache"] == "hit"
        time.sleep(1.5)
        assert decide(http, "risk_mlp", items).json()["results"][0]["cache"] == "miss"
    finally:
        restore = keel_app.modified()
        keel_app.deployment("Ingress", restore)["user_config"]["cache"]["ttl_s"] = 600
        keel_app.deploy(restore)


def test_redis_stopped_mid_run_loses_no_request_and_the_cache_resumes(
        keel_app: KeelApp, http: httpx.Client, cache_redis: PrivateRedis) -> None:
    items = entities(4, offset=80)
    assert decide(http, "risk_mlp", items).status_code == 200
    errors_before = cache_state(http)["errors"]
    cache_redis.stop()
    try:
        def one(i: int) -> int:
            with httpx.Client(base_url=keel_app.base_url, timeout=60) as client:
                if i % 2:
                    return client.post("/v2/models/linear/infer", json={"inputs": [
                        {"name": "features", "shape": [1, 4], "datatype": "FP32",
                         "data": [float(i), 1.0, 2.0, 3.0]}]}).status_code
                return decide(client, "risk_mlp", entities(2, offset=i)).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(40)))
        assert statuses == [200] * 40
        state = cache_state(http)
        assert state["errors"] > errors_before and state["remote"] == "down"
    finally:
        cache_redis.start()
    # Back: after retry_after_s (2 s) the ingress writes to Redis again.
    # (New entities each time: rows computed while Redis was away stay in the replica's
    # in-process layer and are answered from there, never written to Redis later.)
    deadline = time.monotonic() + 30
    attempt = 0
    with cache_redis.client() as check:
        while check.dbsize() == 0:
            assert time.monotonic() < deadline, "the cache did not resume writing to Redis"
            fresh = entities(3, offset=90 + 3 * attempt)
            attempt += 1
            decide(http, "risk_mlp", fresh)
            time.sleep(0.5)
    assert cache_state(http)["remote"] == "up"
    assert decide(http, "risk_mlp", fresh).json()["results"][0]["cache"] == "hit"
