"""FeatureFetcher and the demo feature store, on real Feast stores (no Ray).

Embedded default (parquet + SQLite) in a temp copy of configs/feast; the
production configuration against the machine's PostgreSQL and Redis; and a
private Redis that dies under a prepared store.
"""

from __future__ import annotations

import os
import pickle
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from pydantic import ValidationError

from deployments.errors import (
    ConfigError,
    DependencyUnavailable,
    EntityNotFound,
    InvalidInput,
    KeelError,
)
from deployments.features.core import FeatureFetcher, FeatureRows, FeatureServiceConfig
from graph.demo.dataset import (
    ACCOUNT_KEY,
    FEATURE_REFS,
    MARKET_VIEW,
    PORTFOLIO_VIEW,
    SYMBOL_KEY,
    generate,
)
from graph.demo.feast_store import latest_values, prepare_feature_store
from graph.demo.features import SourceTables
from tests.support.feature_data import ACCOUNTS, SMALL, SYMBOLS
from tests.support.pgbouncer import PgBouncer
from tests.support.redisserver import PrivateRedis
from tests.support.serve_app import copy_feature_repo

DAY = 86_400.0


def expected_row(latest: dict[str, dict[str, np.ndarray]], symbol: str,
                 account: str) -> np.ndarray:
    return np.concatenate([latest[SYMBOL_KEY][symbol], latest[ACCOUNT_KEY][account]])


@pytest.fixture(scope="module")
def latest() -> dict[str, dict[str, np.ndarray]]:
    return latest_values(generate(SMALL))


@pytest.fixture(scope="module")
def embedded_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_feature_repo(tmp_path_factory.mktemp("feast") / "repo")
    prepared = prepare_feature_store(repo, SMALL)
    assert not prepared.skipped
    return repo


@pytest.fixture(scope="module")
def fetcher(embedded_repo: Path) -> FeatureFetcher:
    return FeatureFetcher(embedded_repo)


# -- embedded default ---------------------------------------------------------------------


def test_lookup_serves_the_generators_latest_values(fetcher: FeatureFetcher,
                                                     latest: dict[str, Any]) -> None:
    entities = [{SYMBOL_KEY: s, ACCOUNT_KEY: a} for s in SYMBOLS for a in ACCOUNTS]
    before = time.time()
    rows = fetcher.lookup(entities, FEATURE_REFS)
    assert rows.values.dtype == np.float32
    assert rows.values.shape == (len(entities), len(FEATURE_REFS))
    expected = np.stack([expected_row(latest, e[SYMBOL_KEY], e[ACCOUNT_KEY]) for e in entities])
    np.testing.assert_array_equal(rows.values, expected)
    # The latest generated day was moved to today (UTC midnight): ages under a day.
    assert set(rows.event_timestamps) == {MARKET_VIEW, PORTFOLIO_VIEW}
    for stamps in rows.event_timestamps.values():
        assert len(stamps) == len(entities)
        assert len(set(stamps)) == 1
    ages = rows.ages_s(before)
    assert set(ages) == {MARKET_VIEW, PORTFOLIO_VIEW}
    assert all(0.0 <= age < DAY for age in ages.values())


def test_columns_follow_the_requested_order(fetcher: FeatureFetcher,
                                            latest: dict[str, Any]) -> None:
    order = np.random.default_rng(0).permutation(len(FEATURE_REFS))
    features = [FEATURE_REFS[i] for i in order]
    entities = [{ACCOUNT_KEY: "ACC0003", SYMBOL_KEY: "SYM004"}]
    rows = fetcher.lookup(entities, features)
    np.testing.assert_array_equal(rows.values[0], expected_row(latest, "SYM004", "ACC0003")[order])
    # One view only: only its key is needed, and only its timestamps come back.
    rows = fetcher.lookup([{ACCOUNT_KEY: "ACC0007"}], [f"{PORTFOLIO_VIEW}:leverage"])
    assert rows.values.shape == (1, 1)
    assert rows.values[0, 0] == latest[ACCOUNT_KEY]["ACC0007"][1]
    assert set(rows.event_timestamps) == {PORTFOLIO_VIEW}


def test_a_missing_entity_is_a_404_naming_it(fetcher: FeatureFetcher) -> None:
    entities = [{SYMBOL_KEY: "SYM000", ACCOUNT_KEY: "ACC0000"},
                {SYMBOL_KEY: "SYM001", ACCOUNT_KEY: "ACC9999"}]
    with pytest.raises(EntityNotFound) as info:
        fetcher.lookup(entities, FEATURE_REFS)
    assert info.value.status == 404
    assert info.value.message == ("entities[1]: account_id 'ACC9999' is not in the feature "
                                  "store (view portfolio_features)")
    with pytest.raises(EntityNotFound, match=r"entities\[0\]: symbol 'NOPE'"):
        fetcher.lookup([{SYMBOL_KEY: "NOPE", ACCOUNT_KEY: "ACC0000"}], FEATURE_REFS)


@pytest.mark.parametrize(("entities", "features", "message"), [
    ([{SYMBOL_KEY: "SYM000", ACCOUNT_KEY: "ACC0000"}, {SYMBOL_KEY: "SYM000"}], FEATURE_REFS,
     "entities[1].account_id: missing"),
    ([{SYMBOL_KEY: 3, ACCOUNT_KEY: "ACC0000"}], FEATURE_REFS,
     "entities[0].symbol: expected a string, got int"),
    ([{SYMBOL_KEY: "SYM000", ACCOUNT_KEY: "ACC0000", "desk": "x"}], FEATURE_REFS,
     "entities[0].desk: not an entity key"),
    ([{SYMBOL_KEY: "SYM000", ACCOUNT_KEY: "ACC0000"}], [f"{MARKET_VIEW}:ret_1d"],
     "entities[0].account_id: not an entity key"),
    ([{SYMBOL_KEY: "SYM000"}], ["market_features:ret_1d", "nope_features:x"],
     "features[1]: unknown feature view 'nope_features'"),
    ([{SYMBOL_KEY: "SYM000"}], ["market_features:ret_2d"],
     "features[0]: feature view 'market_features' has no feature 'ret_2d'"),
    ([{SYMBOL_KEY: "SYM000"}], ["ret_1d"], "features[0]: expected 'view:feature'"),
    ([{SYMBOL_KEY: "SYM000"}], ["market_features:ret_1d"] * 2, "features[1]: "),
    ([{SYMBOL_KEY: "SYM000"}], [], "features: expected a non-empty list"),
    (["SYM000"], ["market_features:ret_1d"], "entities[0]: expected an object"),
])
def test_validate_names_the_field(fetcher: FeatureFetcher, entities: Any, features: Any,
                                  message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        fetcher.validate(entities, features)
    assert info.value.message.startswith(message), info.value.message
    with pytest.raises(InvalidInput):
        fetcher.lookup(entities, features)


def test_join_keys(fetcher: FeatureFetcher) -> None:
    assert fetcher.join_keys(FEATURE_REFS) == {SYMBOL_KEY: "STRING", ACCOUNT_KEY: "STRING"}
    assert fetcher.join_keys([f"{MARKET_VIEW}:vol_20d"]) == {SYMBOL_KEY: "STRING"}
    with pytest.raises(InvalidInput, match="unknown feature view 'x'"):
        fetcher.join_keys(["x:y"])


def test_lookup_many_merges_per_feature_list_and_isolates_failures(
    fetcher: FeatureFetcher, latest: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[list[str], int]] = []
    real = fetcher.store.get_online_features

    def counting(*, features: list[str], entity_rows: dict[str, list[Any]],
                 **kwargs: Any) -> Any:
        calls.append((features, len(next(iter(entity_rows.values())))))
        return real(features=features, entity_rows=entity_rows, **kwargs)

    monkeypatch.setattr(fetcher.store, "get_online_features", counting)
    market_only = [f"{MARKET_VIEW}:ret_1d", f"{MARKET_VIEW}:vol_20d"]
    requests: list[tuple[list[dict[str, Any]], list[str]]] = [
        ([{SYMBOL_KEY: "SYM000", ACCOUNT_KEY: "ACC0001"}], FEATURE_REFS),
        ([{SYMBOL_KEY: "SYM002"}], market_only),
        ([{SYMBOL_KEY: 7, ACCOUNT_KEY: "ACC0001"}], FEATURE_REFS),             # invalid
        ([{SYMBOL_KEY: "SYM003", ACCOUNT_KEY: "ACC0404"}], FEATURE_REFS),      # not found
        ([{SYMBOL_KEY: "SYM004", ACCOUNT_KEY: "ACC0002"},
          {SYMBOL_KEY: "SYM001", ACCOUNT_KEY: "ACC0007"}], FEATURE_REFS),
        ([{SYMBOL_KEY: "SYM004"}], market_only),
        ([], FEATURE_REFS),
    ]
    results = fetcher.lookup_many(requests)
    assert sorted(calls) == sorted([(FEATURE_REFS, 4), (market_only, 2)])

    assert isinstance(results[0], FeatureRows)
    np.testing.assert_array_equal(results[0].values[0], expected_row(latest, "SYM000", "ACC0001"))
    assert isinstance(results[1], FeatureRows)
    np.testing.assert_array_equal(results[1].values[0], latest[SYMBOL_KEY]["SYM002"][[0, 3]])
    assert isinstance(results[2], InvalidInput)
    assert results[2].message == "entities[0].symbol: expected a string, got int"
    assert isinstance(results[3], EntityNotFound)
    assert "entities[0]: account_id 'ACC0404'" in results[3].message
    assert isinstance(results[4], FeatureRows)
    np.testing.assert_array_equal(results[4].values, np.stack([
        expected_row(latest, "SYM004", "ACC0002"), expected_row(latest, "SYM001", "ACC0007")]))
    assert len(results[4].event_timestamps[MARKET_VIEW]) == 2
    assert isinstance(results[5], FeatureRows)
    np.testing.assert_array_equal(results[5].values[0], latest[SYMBOL_KEY]["SYM004"][[0, 3]])
    assert isinstance(results[6], FeatureRows)
    assert results[6].values.shape == (0, len(FEATURE_REFS))


def test_a_failing_store_fails_every_request_with_503(
    fetcher: FeatureFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    def broken(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        raise OSError("disk I/O error")

    monkeypatch.setattr(fetcher.store, "get_online_features", broken)
    results = fetcher.lookup_many([
        ([{SYMBOL_KEY: "SYM000", ACCOUNT_KEY: "ACC0000"}], FEATURE_REFS),
        ([{SYMBOL_KEY: "SYM000"}], [f"{MARKET_VIEW}:ret_1d"]),
        ([{SYMBOL_KEY: 1}], [f"{MARKET_VIEW}:ret_1d"]),
    ])
    assert calls == 1  # a failed store is not asked again for the other feature list
    assert [type(r) for r in results] == [DependencyUnavailable, DependencyUnavailable,
                                          InvalidInput]
    assert isinstance(results[0], KeelError)
    assert results[0].status == 503 and "disk I/O error" in results[0].message


def test_prepare_again_is_a_no_op(embedded_repo: Path) -> None:
    data = embedded_repo / "data"
    before = {p.name: p.stat().st_mtime_ns for p in data.iterdir() if p.is_file()}
    again = prepare_feature_store(embedded_repo, SMALL)
    assert again.skipped
    assert again.rows == {MARKET_VIEW: 25, PORTFOLIO_VIEW: 40}
    assert again.entities == {MARKET_VIEW: 5, PORTFOLIO_VIEW: 8}
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir() if p.is_file()} == before


def test_a_deleted_online_store_is_prepared_again(tmp_path: Path,
                                                  latest: dict[str, Any]) -> None:
    repo = copy_feature_repo(tmp_path / "repo")
    prepare_feature_store(repo, SMALL)
    (repo / "data" / "online.db").unlink()
    steps: list[str] = []
    again = prepare_feature_store(repo, SMALL, step=steps.append)
    assert not again.skipped
    assert steps == ["generating the feature rows", "writing the offline store (file)",
                     "feast apply", "feast materialize (online store)",
                     "checking the online store answers"]
    rows = FeatureFetcher(repo).lookup([{SYMBOL_KEY: "SYM001", ACCOUNT_KEY: "ACC0002"}],
                                       FEATURE_REFS)
    np.testing.assert_array_equal(rows.values[0], expected_row(latest, "SYM001", "ACC0002"))


def test_config_errors_name_the_problem(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    repo = copy_feature_repo(tmp_path / "repo")
    for name in ("KEEL_FEAST_REDIS", "KEEL_FEAST_PG_HOST"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"KEEL_FEAST_REDIS.*not set"):
        FeatureFetcher(repo, "feature_store.production.yaml")
    with pytest.raises(ConfigError, match="not found"):
        FeatureFetcher(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="feature store file"):
        FeatureFetcher(repo, "missing.yaml")


def test_fetcher_is_never_pickled(fetcher: FeatureFetcher) -> None:
    with pytest.raises(TypeError, match="build it in the process"):
        pickle.dumps(fetcher)


def test_feature_service_config() -> None:
    assert FeatureServiceConfig() == FeatureServiceConfig(
        max_batch_size=64, batch_wait_timeout_s=0.0, lookup_timeout_s=2.0)
    for bad in ({"max_batch_size": 0}, {"lookup_timeout_s": 0}, {"batch_size": 3}):
        with pytest.raises(ValidationError):
            FeatureServiceConfig.model_validate(bad)


# -- production configuration: PostgreSQL (through PgBouncer) offline store, Redis online ---


@pytest.fixture
def pgbouncer() -> Iterator[PgBouncer]:
    """A private PgBouncer (the deployed pool settings) in front of the machine's PostgreSQL."""
    bouncer = PgBouncer()
    bouncer.start()
    yield bouncer
    bouncer.close()


@pytest.fixture
def production_env(monkeypatch: pytest.MonkeyPatch, pgbouncer: PgBouncer) -> Iterator[str]:
    """Env vars of feature_store.production.yaml for this machine, PostgreSQL reached through
    PgBouncer as on Kubernetes; yields a unique name."""
    monkeypatch.setenv("KEEL_FEAST_REDIS", "127.0.0.1:6379")
    monkeypatch.setenv("KEEL_FEAST_PG_HOST", pgbouncer.host)
    monkeypatch.setenv("KEEL_FEAST_PG_PORT", str(pgbouncer.port))
    monkeypatch.setenv("KEEL_FEAST_PG_DATABASE", "test")
    monkeypatch.setenv("KEEL_FEAST_PG_USER", os.environ.get("KEEL_TEST_PG_USER", "postgres"))
    monkeypatch.setenv("KEEL_FEAST_PG_PASSWORD", "unused-with-trust-auth")
    monkeypatch.setenv("KEEL_FEAST_PG_SSLMODE", "disable")
    yield f"keel_test_{uuid.uuid4().hex[:10]}"


def with_project(repo: Path, fs_yaml: str, project: str) -> None:
    path = repo / fs_yaml
    path.write_text(path.read_text().replace("project: keel\n", f"project: {project}\n", 1))


def delete_redis_keys(client: redis.Redis, project: str) -> None:
    # Feast's Redis key is the serialised entity key followed by the project name.
    keys = list(client.scan_iter(match=f"*{project}", count=1000))
    if keys:
        client.delete(*keys)


def test_production_config_postgres_to_redis(tmp_path: Path, production_env: str,
                                             pgbouncer: PgBouncer,
                                             latest: dict[str, Any]) -> None:
    """Prepare (write, apply, materialise) through PgBouncer; then PgBouncer stops: online
    lookups (Redis) go on, materialising fails naming PgBouncer's address, and works again
    once PgBouncer is back."""
    import psycopg
    from feast import FeatureStore

    name = production_env
    repo = copy_feature_repo(tmp_path / "repo")
    with_project(repo, "feature_store.production.yaml", name)
    tables = SourceTables(market=f"{name}_market", portfolio=f"{name}_portfolio")
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5)
    try:
        prepared = prepare_feature_store(repo, SMALL, "feature_store.production.yaml",
                                         tables=tables)
        assert (prepared.offline_store, prepared.online_store) == ("postgres", "redis")
        assert list(client.scan_iter(match=f"*{name}"))  # written to the shared Redis
        # Every PostgreSQL connection went through PgBouncer (its pool for database test).
        [stats] = [row for row in pgbouncer.show("STATS") if row["database"] == "test"]
        assert stats["total_query_count"] > 0, stats
        fetcher = FeatureFetcher(repo, "feature_store.production.yaml")
        entities = [{SYMBOL_KEY: s, ACCOUNT_KEY: a} for s in SYMBOLS for a in ACCOUNTS[:3]]
        expected = np.stack([expected_row(latest, e[SYMBOL_KEY], e[ACCOUNT_KEY])
                             for e in entities])
        rows = fetcher.lookup(entities, FEATURE_REFS)
        np.testing.assert_array_equal(rows.values, expected)
        with pytest.raises(EntityNotFound, match="symbol 'SYM999'"):
            fetcher.lookup([{SYMBOL_KEY: "SYM999", ACCOUNT_KEY: "ACC0000"}], FEATURE_REFS)
        # Up to date: the manifest matches and Redis answers the probe.
        assert prepare_feature_store(repo, SMALL, "feature_store.production.yaml",
                                     tables=tables).skipped

        # PgBouncer goes away. The online path never touches PostgreSQL (Redis online store,
        # file registry): lookups still answer.
        pgbouncer.stop()
        np.testing.assert_array_equal(fetcher.lookup(entities, FEATURE_REFS).values, expected)
        # What reads the offline store fails at once, naming where it tried to connect.
        store = FeatureStore(repo_path=str(repo),
                             fs_yaml_file=repo / "feature_store.production.yaml")
        window = (prepared.start - timedelta(seconds=1), prepared.end + timedelta(seconds=1))
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            store.materialize(*window)
        assert time.monotonic() - started < 10
        message = str(info.value)
        assert pgbouncer.host in message and f"port {pgbouncer.port}" in message, message
        with pytest.raises(psycopg.OperationalError, match=f"port {pgbouncer.port}"):
            prepare_feature_store(repo, SMALL, "feature_store.production.yaml", tables=tables,
                                  force=True)
        # Back on the same address: materialising and preparing work again.
        pgbouncer.start()
        store.materialize(*window)
        again = prepare_feature_store(repo, SMALL, "feature_store.production.yaml",
                                      tables=tables, force=True)
        assert not again.skipped
        np.testing.assert_array_equal(fetcher.lookup(entities, FEATURE_REFS).values, expected)
    finally:
        delete_redis_keys(client, name)
        client.close()
        with psycopg.connect(host="127.0.0.1", dbname="test",
                             user=os.environ["KEEL_FEAST_PG_USER"], autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {tables.market}, {tables.portfolio}")


# -- a Redis online store that dies --------------------------------------------------------


def test_a_dead_redis_fails_the_lookup_fast_with_503(tmp_path: Path) -> None:
    server = PrivateRedis()
    server.start()
    try:
        repo = copy_feature_repo(tmp_path / "repo")
        # Parquet sources, the private Redis as online store, the production socket timeouts.
        (repo / "dead.yaml").write_text(
            "project: keel\nprovider: local\n"
            "registry: {path: data/registry.db, cache_ttl_seconds: 60, cache_mode: thread}\n"
            "online_store:\n  type: redis\n  connection_string: "
            f"\"127.0.0.1:{server.port},socket_timeout=0.5,socket_connect_timeout=0.5\"\n"
            "offline_store: {type: file}\nentity_key_serialization_version: 3\n")
        prepare_feature_store(repo, SMALL, "dead.yaml")
        fetcher = FeatureFetcher(repo, "dead.yaml")
        entity = [{SYMBOL_KEY: "SYM000", ACCOUNT_KEY: "ACC0000"}]
        assert fetcher.lookup(entity, FEATURE_REFS).values.shape == (1, 12)
    finally:
        server.stop()
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as info:
        fetcher.lookup(entity, FEATURE_REFS)
    assert time.monotonic() - started < 5  # raises, not hangs (about 25 ms here)
    assert info.value.status == 503 and "redis" in info.value.message
    # A replica starting while Redis is down still starts (the registry is a file), its
    # warm-up logs instead of raising, and its lookups are 503s.
    starting = FeatureFetcher(repo, "dead.yaml")
    starting.warm_up()
    assert isinstance(starting.lookup_many([(entity, FEATURE_REFS)])[0], DependencyUnavailable)

