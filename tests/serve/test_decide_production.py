"""``/v1/decide`` on the production feature store configuration, on real services.

configs/feast/feature_store.production.yaml as shipped: the sources are written
to PostgreSQL (the machine's, database ``test``, tables unique to this run),
materialised into a Redis online store (a private redis-server that the last
test stops), and served by a second Keel application next to the main one.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support.decisions import entities, expected_scores
from tests.support.redisserver import PrivateRedis
from tests.support.serve_app import KeelApp, copy_feature_repo, serve_test_config

pytestmark = pytest.mark.slow

APP = "keel-production"
PREFIX = "/production"


@pytest.fixture(scope="module")
def online_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def production_app(keel_app: KeelApp, model_repo: Path, online_redis: PrivateRedis,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second application over the production store; yields its base URL."""
    import psycopg

    from graph.demo.dataset import DatasetConfig
    from graph.demo.feast_store import prepare_feature_store
    from graph.demo.features import SourceTables

    run = uuid.uuid4().hex[:8]
    tables = SourceTables(f"keel_test_market_{run}", f"keel_test_portfolio_{run}")
    env = {
        "KEEL_FEAST_REDIS": f"127.0.0.1:{online_redis.port}",
        "KEEL_FEAST_PG_HOST": "127.0.0.1", "KEEL_FEAST_PG_PORT": "5432",
        "KEEL_FEAST_PG_DATABASE": "test",
        "KEEL_FEAST_PG_USER": os.environ.get("KEEL_TEST_PG_USER", "postgres"),
        "KEEL_FEAST_PG_PASSWORD": "unused-with-trust-auth", "KEEL_FEAST_PG_SSLMODE": "disable",
        # The prediction cache of this application lives in the same private Redis.
        "KEEL_REDIS_URL": online_redis.url,
    }
    repo = copy_feature_repo(tmp_path_factory.mktemp("feast-production"))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        prepared = prepare_feature_store(repo, dataset_config=DatasetConfig(n_train_rows=4000),
                                         fs_yaml="feature_store.production.yaml",
                                         tables=tables)
    assert prepared.online_store == "redis" and prepared.offline_store == "postgres"

    app = serve_test_config(model_repo, repo)["applications"][0]
    app.update(name=APP, route_prefix=PREFIX, runtime_env={"env_vars": env})
    app["args"].update(models=["risk_mlp"], feature_store_yaml="feature_store.production.yaml")
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("Ingress", "FeatureService", "risk_mlp")]
    try:
        with keel_app.alongside(app) as url:
            yield url
    finally:
        with psycopg.connect(host="127.0.0.1", dbname="test", user=env["KEEL_FEAST_PG_USER"],
                             autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {tables.market}, {tables.portfolio}")


def _decide(base_url: str, items: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/decide", json={"model": "risk_mlp", "entities": items},
                      timeout=30)


def test_decide_reads_features_from_the_redis_online_store(production_app: str,
                                                           model_repo: Path) -> None:
    items = entities(5, offset=3)
    answer = _decide(production_app, items)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    np.testing.assert_allclose([r["score"] for r in results],
                               expected_scores(model_repo, "risk_mlp", items), rtol=1e-5,
                               atol=1e-6)
    assert [r["cache"] for r in results] == ["miss"] * 5
    again = _decide(production_app, items).json()["results"]
    assert [r["cache"] for r in again] == ["hit"] * 5
    missing = _decide(production_app, [{"symbol": "SYM001", "account_id": "ACC9999"}])
    assert missing.status_code == 404 and "ACC9999" in missing.json()["error"]


def test_a_feature_store_that_does_not_answer_is_503_and_tensors_still_work(
        production_app: str, online_redis: PrivateRedis) -> None:
    online_redis.stop()  # the online store (and this app's cache Redis) is gone
    started = time.monotonic()
    answer = _decide(production_app, entities(2, offset=11))
    elapsed = time.monotonic() - started
    assert answer.status_code == 503, answer.text
    assert "feature store" in answer.json()["error"]
    assert elapsed < 10, f"a dead store must fail fast, took {elapsed:.1f} s"
    x = np.random.default_rng(3).normal(size=(1, 12)).astype(np.float32)
    infer = httpx.post(f"{production_app}/v2/models/risk_mlp/infer", timeout=30, json={
        "inputs": [{"name": "features", "shape": [1, 12], "datatype": "FP32",
                    "data": x.reshape(-1).tolist()}]})
    assert infer.status_code == 200, infer.text
