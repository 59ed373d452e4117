"""``/v1/decide`` on the production feature store configuration, on real services.

configs/feast/feature_store.production.yaml as shipped: the sources are written
to PostgreSQL (the machine's, database ``test``, tables unique to this run) through
a private PgBouncer with the deployed pool settings (as on Kubernetes), materialised
into a Redis online store (a private redis-server that the last test stops), and
served by a second Keel application next to the main one.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support.decisions import entities, expected_scores
from tests.support.pgbouncer import PgBouncer
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
def pgbouncer() -> Iterator[PgBouncer]:
    """The offline store's PostgreSQL as the replicas and prepare reach it: via PgBouncer."""
    bouncer = PgBouncer()
    bouncer.start()
    yield bouncer
    bouncer.close()


#: What production_app prepared, for the tests that use the offline store again.
PREPARED: dict[str, Any] = {}


@pytest.fixture(scope="module")
def production_app(keel_app: KeelApp, model_repo: Path, online_redis: PrivateRedis,
                   pgbouncer: PgBouncer,
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
        "KEEL_FEAST_PG_HOST": pgbouncer.host, "KEEL_FEAST_PG_PORT": str(pgbouncer.port),
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
    PREPARED.update(repo=repo, env=env, tables=tables, prepared=prepared)

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


def _infer(base_url: str) -> httpx.Response:
    x = np.random.default_rng(3).normal(size=(1, 12)).astype(np.float32)
    return httpx.post(f"{base_url}/v2/models/risk_mlp/infer", timeout=30, json={
        "inputs": [{"name": "features", "shape": [1, 12], "datatype": "FP32",
                    "data": x.reshape(-1).tolist()}]})


def test_pgbouncer_stopped_mid_traffic_leaves_decide_and_infer_answering(
        production_app: str, pgbouncer: PgBouncer, model_repo: Path,
        tmp_path: Path) -> None:
    """/v1/decide reads only the online store (Redis) and a file registry: PostgreSQL (and
    the PgBouncer in front of it) is off its path. Stopping PgBouncer under steady decide
    and infer traffic fails nothing; what reads the offline store (materialise, prepare)
    fails naming PgBouncer's address, and works again once it is back."""
    import psycopg
    from feast import FeatureStore

    from graph.demo.dataset import DatasetConfig
    from graph.demo.feast_store import prepare_feature_store

    stop = threading.Event()
    answers: list[tuple[str, float, int, str]] = []

    def traffic() -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                # Entities no other test here asks for (the ingress reuses a feature row for
                # max_staleness_s: the next test must find none of them fetched), varied
                # enough that rows are fetched again during the outage.
                items = [{"symbol": f"SYM{30 + (i + k) % 20:03d}",
                          "account_id": f"ACC{100 + (7 * i + k) % 100:04d}"} for k in (0, 1)]
                got = client.post(f"{production_app}/v1/decide",
                                  json={"model": "risk_mlp", "entities": items})
                answers.append(("decide", time.monotonic(), got.status_code, got.text[:200]))
                if i % 4 == 0:
                    inf = _infer(production_app)
                    answers.append(("infer", time.monotonic(), inf.status_code, inf.text[:200]))
                i += 1
                time.sleep(0.02)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        time.sleep(1.0)
        pgbouncer.stop()
        stopped_at = time.monotonic()
        time.sleep(6.0)  # longer than the ingress's feature-row reuse (max_staleness_s: 5)

        # The offline store's users fail fast, naming where they tried to connect. A copy of
        # the prepared repository: its registry file is not the one the replicas read.
        repo = shutil.copytree(PREPARED["repo"], tmp_path / "repo")
        prepared = PREPARED["prepared"]
        window = (prepared.start - timedelta(seconds=1), prepared.end + timedelta(seconds=1))
        with pytest.MonkeyPatch.context() as patch:
            for key, value in PREPARED["env"].items():
                patch.setenv(key, value)
            store = FeatureStore(repo_path=str(repo),
                                 fs_yaml_file=repo / "feature_store.production.yaml")
            with pytest.raises(psycopg.OperationalError) as info:
                store.materialize(*window)
            message = str(info.value)
            assert pgbouncer.host in message and f"port {pgbouncer.port}" in message, message
            with pytest.raises(psycopg.OperationalError, match=f"port {pgbouncer.port}"):
                prepare_feature_store(repo, DatasetConfig(n_train_rows=4000),
                                      "feature_store.production.yaml",
                                      tables=PREPARED["tables"], force=True)
            pgbouncer.start()
            restarted_at = time.monotonic()
            store.materialize(*window)  # back: the offline store answers again
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join(timeout=60)
        if pgbouncer.pid is None:
            pgbouncer.start()

    during = [a for a in answers if stopped_at <= a[1] <= restarted_at]
    assert sum(1 for a in during if a[0] == "decide") >= 20, len(during)
    assert any(a[0] == "infer" for a in during)
    failed = [a for a in answers if a[2] != 200]
    assert failed == [], failed[:5]
    items = entities(5, offset=21)
    answer = _decide(production_app, items)
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose([r["score"] for r in answer.json()["results"]],
                               expected_scores(model_repo, "risk_mlp", items), rtol=1e-5,
                               atol=1e-6)


def test_a_feature_store_that_does_not_answer_is_503_and_tensors_still_work(
        production_app: str, online_redis: PrivateRedis) -> None:
    online_redis.stop()  # the online store (and this app's cache Redis) is gone
    started = time.monotonic()
    answer = _decide(production_app, entities(2, offset=11))
    elapsed = time.monotonic() - started
    assert answer.status_code == 503, answer.text
    assert "feature store" in answer.json()["error"]
    assert elapsed < 10, f"a dead store must fail fast, took {elapsed:.1f} s"
    infer = _infer(production_app)
    assert infer.status_code == 200, infer.text
