"""Prepare the demo feature store: sources, registry, online store (``keel prepare``).

:func:`prepare_feature_store` writes the market and portfolio frames of the SAME
seeded generator the demo models are trained on (:func:`graph.demo.dataset.generate`)
into the repository's offline sources — parquet files under ``data/`` for the
embedded configuration, PostgreSQL tables for the production one — applies the
definitions of :mod:`graph.demo.features`, materialises the whole date range into
the online store (SQLite or Redis), and reads a few entities back to check that
the store serves the generator's values.

Event times are shifted by whole days so that the latest generated day is the
day of the first prepare: the served features then look as fresh as a daily
pipeline's would (feature ages, staleness gauges). Values are never touched.
Feast 0.67 does not enforce a view's TTL on online reads (see
:mod:`graph.demo.features`); the shift is not needed for the store to serve.

Idempotent: ``data/.keel-prepare-<config>.json`` records a fingerprint of the
inputs (data set, configuration file, source kind and tables). A later call with
the same fingerprint returns the recorded result when the store is still there
(local files exist; a remote online store answers a probe lookup). Concurrent
prepares of one repository are serialised with a lock file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from deployments.errors import ConfigError, KeelError
from deployments.features.core import (
    FeatureFetcher,
    open_feature_store,
    require_env,
    resolve_feature_repo,
    resolve_fs_yaml,
)
from graph.demo import Step, quiet
from graph.demo.dataset import (
    ACCOUNT_KEY,
    FEATURE_REFS,
    MARKET_FEATURES,
    MARKET_VIEW,
    PORTFOLIO_FEATURES,
    PORTFOLIO_VIEW,
    SYMBOL_KEY,
    Dataset,
    DatasetConfig,
    generate,
)
from graph.demo.features import (
    CREATED_FIELD,
    TIMESTAMP_FIELD,
    SourceKind,
    SourceTables,
    default_tables,
)
from graph.files import exclusive, replace_atomically, write_atomic

logger = logging.getLogger(__name__)

#: Bump whenever the prepared store changes for the same inputs: it forces a re-prepare.
PREPARE_FORMAT = 1
DATA_DIR = "data"
LOCK_FILE = ".keel-prepare.lock"
# Plain (optionally schema-qualified) identifiers: PostgreSQLSource pastes the table
# name into its SQL unquoted.
_TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")


@dataclass(frozen=True)
class PreparedFeatureStore:
    """What :func:`prepare_feature_store` did (or found already done)."""

    repo_path: Path
    fs_yaml: Path
    project: str
    online_store: str
    offline_store: str
    #: Rows written per feature view's source.
    rows: dict[str, int]
    #: Entities per feature view (one online row each).
    entities: dict[str, int]
    #: Days added to the generator's event times (latest day = prepare day).
    shift_days: int
    #: The materialised event-time range, inclusive (UTC).
    start: datetime
    end: datetime
    seconds: float
    #: True when the recorded preparation was reused and nothing was written.
    skipped: bool = False

    def describe(self) -> str:
        """One line for ``keel prepare``."""
        state = "up to date" if self.skipped else f"prepared in {self.seconds:.1f} s"
        counts = ", ".join(f"{view} {self.entities[view]} entities/{self.rows[view]} rows"
                           for view in sorted(self.rows))
        return (f"feature store {self.repo_path} ({self.fs_yaml.name}, project "
                f"{self.project}, {self.offline_store} -> {self.online_store}): {state}; "
                f"{counts}; event times {self.start:%Y-%m-%d} .. {self.end:%Y-%m-%d}")


def prepare_feature_store(
    repo_path: str | Path = "configs/feast",
    dataset_config: DatasetConfig = DatasetConfig(),
    fs_yaml: str | Path | None = None,
    force: bool = False,
    *,
    tables: SourceTables | None = None,
    today: date | None = None,
    step: Step | None = None,
) -> PreparedFeatureStore:
    """Write the demo sources, apply the definitions and materialise them; reuse a
    matching preparation unless ``force``.

    ``fs_yaml`` selects another configuration file of the repository (e.g.
    ``feature_store.production.yaml``); ``tables`` the source locations (default:
    :func:`graph.demo.features.default_tables`); ``today`` the day the latest
    generated day moves to (default: today, UTC).
    """
    started = time.perf_counter()
    repo = resolve_feature_repo(repo_path)
    config_file = resolve_fs_yaml(repo, fs_yaml)
    require_env(config_file)
    # The file as Feast will read it, without importing Feast (seconds): a store that is
    # up to date is recognised in milliseconds.
    store_file = _StoreFile.read(config_file)
    kind = store_file.source_kind()
    where = tables or default_tables(kind)
    if kind == "postgres":
        for table in (where.market, where.portfolio):
            if not _TABLE_NAME.match(table):
                raise ConfigError(f"table name {table!r}: use a lower-case identifier "
                                  "(optionally schema.table)")
    fingerprint = _fingerprint(dataset_config, store_file, kind, where)
    data_dir = repo / DATA_DIR
    manifest_path = data_dir / f".keel-prepare-{config_file.stem}.json"

    def recorded() -> PreparedFeatureStore | None:
        return _recorded(manifest_path, fingerprint, repo, store_file, kind, where)

    if not force and (found := recorded()) is not None:
        logger.info("feature store %s (%s) is up to date", repo, config_file.name)
        return found

    data_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(data_dir / LOCK_FILE), _quiet_feast():
        if not force and (found := recorded()) is not None:
            return found
        manifest_path.unlink(missing_ok=True)  # must not vouch for a half-done prepare
        prepared = _prepare(repo, store_file, dataset_config, kind, where,
                            today or datetime.now(UTC).date(), started, step or quiet)
        _write_manifest(manifest_path, fingerprint, prepared, _probe_entities(dataset_config))
        return prepared


@dataclass(frozen=True)
class _StoreFile:
    """The parts of a feature_store.yaml that prepare needs, env vars expanded."""

    path: Path
    text: str
    project: str
    registry_path: str
    online_type: str
    online_path: str
    offline_type: str

    @classmethod
    def read(cls, path: Path) -> _StoreFile:
        text = os.path.expandvars(path.read_text())
        try:
            raw = yaml.safe_load(text) or {}
            registry = raw.get("registry", "data/registry.db")
            online = raw.get("online_store") or {}
            offline = raw.get("offline_store") or {}
            return cls(
                path=path, text=text, project=str(raw["project"]),
                registry_path=str(registry.get("path", "") if isinstance(registry, dict)
                                  else registry),
                online_type=_short_type(str(online.get("type", "sqlite"))),
                online_path=str(online.get("path", "data/online.db")),
                offline_type=_short_type(str(offline.get("type", "file"))),
            )
        except (yaml.YAMLError, KeyError, AttributeError, TypeError) as exc:
            raise ConfigError(f"{path}: not a feature store file ({exc})") from exc

    def source_kind(self) -> SourceKind:
        if self.offline_type in ("file", "dask"):
            return "file"
        if self.offline_type == "postgres":
            return "postgres"
        raise ConfigError(f"{self.path}: offline_store.type {self.offline_type!r} is not "
                          "supported by the demo (file or postgres)")


def _short_type(store_type: str) -> str:
    """``feast.infra....RedisOnlineStore`` or ``redis`` -> ``redis``."""
    name = store_type.rsplit(".", 1)[-1].lower()
    for suffix in ("onlinestore", "offlinestore"):
        name = name.removesuffix(suffix)
    return {"postgresql": "postgres"}.get(name, name)


def _fingerprint(config: DatasetConfig, store_file: _StoreFile, kind: SourceKind,
                 tables: SourceTables) -> str:
    payload = {
        "format": PREPARE_FORMAT,
        "dataset": {k: str(v) for k, v in dataclasses.asdict(config).items()},
        # Expanded as Feast reads it: another Redis or database is another store.
        "fs_yaml": hashlib.sha256(store_file.text.encode()).hexdigest(),
        "kind": kind,
        "tables": dataclasses.asdict(tables),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _prepare(repo: Path, store_file: _StoreFile, dataset_config: DatasetConfig,
             kind: SourceKind, tables: SourceTables, today: date,
             started: float, step: Step) -> PreparedFeatureStore:
    from graph.demo.features import feature_definitions

    config_file = store_file.path
    store = open_feature_store(repo, config_file)
    repo_config = store.config

    step("generating the feature rows")
    dataset = generate(dataset_config)
    shift_days = (today - dataset_config.end_date).days
    market = _shifted(dataset.market, shift_days)
    portfolio = _shifted(dataset.portfolio, shift_days)

    step(f"writing the offline store ({kind})")
    if kind == "file":
        _write_parquet(repo / tables.market, market)
        _write_parquet(repo / tables.portfolio, portfolio)
    else:
        _write_postgres(repo_config.offline_store, {tables.market: market,
                                                    tables.portfolio: portfolio})

    step("feast apply")
    store.apply(feature_definitions(kind, tables).objects())
    start = min(market[TIMESTAMP_FIELD].min(), portfolio[TIMESTAMP_FIELD].min())
    end = max(market[TIMESTAMP_FIELD].max(), portfolio[TIMESTAMP_FIELD].max())
    # Feast's window is [start, end); one second either side covers every row.
    step("feast materialize (online store)")
    store.materialize(start_date=start.to_pydatetime() - timedelta(seconds=1),
                      end_date=end.to_pydatetime() + timedelta(seconds=1))
    step("checking the online store answers")
    _check_served(repo, config_file, dataset)

    seconds = time.perf_counter() - started
    prepared = PreparedFeatureStore(
        repo_path=repo, fs_yaml=config_file, project=repo_config.project,
        online_store=store_file.online_type, offline_store=store_file.offline_type,
        rows={MARKET_VIEW: len(market), PORTFOLIO_VIEW: len(portfolio)},
        entities={MARKET_VIEW: int(market[SYMBOL_KEY].nunique()),
                  PORTFOLIO_VIEW: int(portfolio[ACCOUNT_KEY].nunique())},
        shift_days=shift_days, start=start.to_pydatetime(), end=end.to_pydatetime(),
        seconds=seconds,
    )
    logger.debug("%s", prepared.describe())
    return prepared


def _shifted(frame: pd.DataFrame, days: int) -> pd.DataFrame:
    out = frame.copy()
    delta = pd.Timedelta(days=days)
    out[TIMESTAMP_FIELD] = out[TIMESTAMP_FIELD] + delta
    out[CREATED_FIELD] = out[CREATED_FIELD] + delta
    return out


def latest_values(dataset: Dataset) -> dict[str, dict[str, np.ndarray[Any, Any]]]:
    """The generator's latest row per entity: ``{"symbol": {"SYM000": [6 floats]}, ...}``,
    in MARKET_FEATURES / PORTFOLIO_FEATURES order (what the online store must serve)."""
    out: dict[str, dict[str, np.ndarray[Any, Any]]] = {}
    for key, frame, names in ((SYMBOL_KEY, dataset.market, MARKET_FEATURES),
                              (ACCOUNT_KEY, dataset.portfolio, PORTFOLIO_FEATURES)):
        latest = frame.sort_values(TIMESTAMP_FIELD).groupby(key).tail(1)
        out[key] = {str(entity): row.astype(np.float32) for entity, row in
                    zip(latest[key], latest[names].to_numpy(np.float32), strict=True)}
    return out


def _probe_entities(dataset_config: DatasetConfig) -> list[dict[str, Any]]:
    """The first and last symbol and account (covers both ends of each table)."""
    last_sym, last_acc = dataset_config.n_symbols - 1, dataset_config.n_accounts - 1
    return [{SYMBOL_KEY: "SYM000", ACCOUNT_KEY: "ACC0000"},
            {SYMBOL_KEY: f"SYM{last_sym:03d}", ACCOUNT_KEY: f"ACC{last_acc:04d}"}]


def _check_served(repo: Path, config_file: Path, dataset: Dataset) -> None:
    """Read the probe entities back: the store must serve the generator's latest values."""
    entities = _probe_entities(dataset.config)
    rows = FeatureFetcher(repo, config_file).lookup(entities, FEATURE_REFS)
    latest = latest_values(dataset)
    for i, entity in enumerate(entities):
        expected = np.concatenate([latest[SYMBOL_KEY][entity[SYMBOL_KEY]],
                                   latest[ACCOUNT_KEY][entity[ACCOUNT_KEY]]])
        if not np.array_equal(rows.values[i], expected):
            raise RuntimeError(f"feature store {repo} serves {rows.values[i].tolist()} for "
                               f"{entity}, the generator has {expected.tolist()}")


def _recorded(manifest_path: Path, fingerprint: str, repo: Path, store_file: _StoreFile,
              kind: SourceKind, tables: SourceTables) -> PreparedFeatureStore | None:
    """The recorded preparation when it matches and the store is still there."""
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") != fingerprint:
            return None
        prepared = PreparedFeatureStore(
            repo_path=repo, fs_yaml=store_file.path, project=str(manifest["project"]),
            online_store=str(manifest["online_store"]),
            offline_store=str(manifest["offline_store"]),
            rows={str(k): int(v) for k, v in manifest["rows"].items()},
            entities={str(k): int(v) for k, v in manifest["entities"].items()},
            shift_days=int(manifest["shift_days"]),
            start=datetime.fromisoformat(manifest["start"]),
            end=datetime.fromisoformat(manifest["end"]),
            seconds=float(manifest["seconds"]), skipped=True,
        )
        probes = [dict(entity) for entity in manifest["probe_entities"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing or unreadable: prepare again
    local = [_local_path(repo, store_file.registry_path)]
    if kind == "file":
        local += [repo / tables.market, repo / tables.portfolio]
    if store_file.online_type == "sqlite":
        local.append(_local_path(repo, store_file.online_path))
    if any(path is not None and not path.exists() for path in local):
        return None
    if store_file.online_type != "sqlite":
        # A remote online store may have been flushed since: ask it.
        try:
            FeatureFetcher(repo, store_file.path).lookup(probes, FEATURE_REFS)
        except KeelError as exc:
            logger.info("feature store %s needs preparing again: %s", repo, exc.message)
            return None
    return prepared


def _local_path(repo: Path, path: str) -> Path | None:
    """A registry/online-store path as a local file; None for a URL (s3://, gs://)."""
    if not path or "://" in path:
        return None
    candidate = Path(path)
    return candidate if candidate.is_absolute() else repo / candidate


def _write_manifest(path: Path, fingerprint: str, prepared: PreparedFeatureStore,
                    probes: list[dict[str, Any]]) -> None:
    manifest = {
        "format": PREPARE_FORMAT,
        "fingerprint": fingerprint,
        "project": prepared.project,
        "online_store": prepared.online_store,
        "offline_store": prepared.offline_store,
        "rows": prepared.rows,
        "entities": prepared.entities,
        "shift_days": prepared.shift_days,
        "start": prepared.start.isoformat(),
        "end": prepared.end.isoformat(),
        "seconds": round(prepared.seconds, 3),
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "probe_entities": probes,
    }
    write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    replace_atomically(path, lambda tmp: frame.to_parquet(tmp, index=False))


def _write_postgres(offline_config: Any, frames: dict[str, pd.DataFrame]) -> None:
    """Replace each table with its frame, in one transaction (readers see old or new)."""
    import psycopg
    from psycopg import sql

    params = {
        "host": offline_config.host, "port": offline_config.port,
        "dbname": offline_config.database, "user": offline_config.user,
        "password": offline_config.password, "connect_timeout": 10,
    }
    if offline_config.sslmode:
        params["sslmode"] = offline_config.sslmode
    with psycopg.connect(**params) as conn, conn.cursor() as cur:
        for table, frame in frames.items():
            name = sql.Identifier(*table.split("."))
            key = frame.columns[0]
            features = [c for c in frame.columns if c not in (key, TIMESTAMP_FIELD, CREATED_FIELD)]
            columns = [sql.SQL("{} TEXT NOT NULL").format(sql.Identifier(key)),
                       sql.SQL("{} TIMESTAMPTZ NOT NULL").format(sql.Identifier(TIMESTAMP_FIELD)),
                       sql.SQL("{} TIMESTAMPTZ NOT NULL").format(sql.Identifier(CREATED_FIELD))]
            columns += [sql.SQL("{} REAL").format(sql.Identifier(f)) for f in features]
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))
            cur.execute(sql.SQL("CREATE TABLE {} ({})").format(name, sql.SQL(", ").join(columns)))
            ordered = [key, TIMESTAMP_FIELD, CREATED_FIELD, *features]
            copy = sql.SQL("COPY {} ({}) FROM STDIN").format(
                name, sql.SQL(", ").join(sql.Identifier(c) for c in ordered))
            records = frame[ordered].astype(object).to_numpy().tolist()
            with cur.copy(copy) as writer:
                for record in records:
                    # float32 -> Python float is exact; REAL stores it back unchanged.
                    writer.write_row(record)
        conn.commit()


@contextlib.contextmanager
def _quiet_feast() -> Iterator[None]:
    """Feast logs "Registry cache expired, so refreshing" at INFO on every registry read
    of an apply/materialise (a dozen per prepare); keep its warnings only."""
    feast_logger = logging.getLogger("feast")
    level = feast_logger.level
    feast_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        feast_logger.setLevel(level)


__all__ = ["PREPARE_FORMAT", "PreparedFeatureStore", "latest_values", "prepare_feature_store"]
