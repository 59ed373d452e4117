"""Entity-keyed feature lookup over a Feast feature store (no Ray here).

:class:`FeatureFetcher` opens a ``feast.FeatureStore`` from a feature repository
(``feature_store.yaml``, or another file such as ``feature_store.production.yaml``)
in the process that uses it, checks entity rows against the views' join keys, and
turns Feast's online response into a float32 matrix in the caller's column order,
with every row's event time. Missing entities are :class:`EntityNotFound` (404)
naming the entity; a store that fails is :class:`DependencyUnavailable` (503).
:meth:`FeatureFetcher.lookup_many` merges many requests into one store call per
distinct feature list, which is what the Ray deployment batches into.

Timeouts are the caller's: the deployment runs a lookup in a thread under
``asyncio.wait_for(..., FeatureServiceConfig.lookup_timeout_s)``. The production
configuration gives Redis socket timeouts too, so a dead Redis raises rather
than leaving the thread blocked.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import (
    ConfigError,
    DependencyUnavailable,
    EntityNotFound,
    InvalidInput,
    KeelError,
    quoted,
)
from deployments.paths import search_paths

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

#: The feature store file Feast reads when no other is named.
DEFAULT_FS_YAML = "feature_store.yaml"

# FieldStatus values of Feast's serving proto (feast.protos.feast.serving.ServingService_pb2);
# copied so this module does not import Feast before it needs a store.
_PRESENT, _NULL_VALUE, _NOT_FOUND, _OUTSIDE_MAX_AGE = 1, 2, 3, 4
# ${NAME} and $NAME, as os.path.expandvars substitutes them when Feast loads the file.
_ENV_REFERENCE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


class FeatureServiceConfig(BaseModel):
    """Live knobs of the FeatureService deployment (its ``user_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Lookups merged into one ``get_online_features`` call.
    max_batch_size: int = Field(default=64, ge=1)
    #: How long a batch waits to fill; at low load this is pure latency.
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0)
    #: A store that does not answer within this is DependencyUnavailable (503), never a hang.
    lookup_timeout_s: float = Field(default=2.0, gt=0.0)


@dataclass
class FeatureRows:
    """Features of a list of entities, in the order asked for."""

    #: float32 ``[n_entities, n_features]``, columns in the caller's feature order.
    values: np.ndarray
    #: Per feature view: the event time (unix seconds) of each entity's row.
    event_timestamps: dict[str, list[float]] = field(default_factory=dict)

    def ages_s(self, now: float) -> dict[str, float]:
        """Per feature view: the age of its oldest row at ``now`` (unix seconds)."""
        return {view: max(now - ts for ts in stamps)
                for view, stamps in self.event_timestamps.items() if stamps}


@dataclass(frozen=True)
class _View:
    """What a lookup needs to know of one feature view."""

    name: str
    #: feature name -> Feast value type name (e.g. FLOAT)
    features: dict[str, str]
    #: join key -> Feast value type name (e.g. STRING)
    join_keys: dict[str, str]


def resolve_feature_repo(path: str | Path) -> Path:
    """The feature repository as an absolute path: as given, else under the cwd, else
    under the project root (replicas and ``keel prepare`` may run from elsewhere)."""
    chosen = Path(path).expanduser()
    candidates = search_paths(chosen)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise ConfigError(f"feature repository {str(chosen)!r} not found (looked in "
                      f"{[str(c) for c in candidates]})")


def resolve_fs_yaml(repo_path: Path, fs_yaml: str | Path | None) -> Path:
    """The feature store file: ``fs_yaml`` (relative to the cwd, then the repository)
    or the repository's ``feature_store.yaml``."""
    # None or '' (an empty CLI option): the repository's own file.
    candidates = search_paths(fs_yaml, repo_path) if fs_yaml else [repo_path / DEFAULT_FS_YAML]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"feature store file {str(fs_yaml or DEFAULT_FS_YAML)!r} not found "
                      f"(looked in {[str(c) for c in candidates]})")


def unset_env_references(fs_yaml: Path) -> list[str]:
    """Environment variables the file's values reference that are not set.

    Feast expands ``${VAR}`` with ``os.path.expandvars``, which leaves an unset
    variable in place as text: a Redis address of ``${KEEL_FEAST_REDIS}`` fails
    much later and much less clearly than naming the variable up front.
    """
    try:
        raw = yaml.safe_load(fs_yaml.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{fs_yaml}: {exc}") from exc
    missing: list[str] = []
    for value in _strings(raw):
        for match in _ENV_REFERENCE.finditer(value):
            name = match.group(1) or match.group(2)
            if name not in os.environ and name not in missing:
                missing.append(name)
    return missing


def require_env(fs_yaml: Path) -> None:
    """``ConfigError`` naming every environment variable the file needs and lacks."""
    missing = unset_env_references(fs_yaml)
    if missing:
        raise ConfigError(f"{fs_yaml}: environment variable(s) {', '.join(missing)} not set")


def open_feature_store(repo_path: str | Path, fs_yaml: str | Path | None = None) -> FeatureStore:
    """A ``feast.FeatureStore`` for the repository; ``ConfigError`` naming what is wrong."""
    from feast import FeatureStore

    repo = resolve_feature_repo(repo_path)
    config_file = resolve_fs_yaml(repo, fs_yaml)
    require_env(config_file)
    try:
        return FeatureStore(repo_path=str(repo), fs_yaml_file=config_file)
    except Exception as exc:  # Feast raises many types for a bad file (pydantic, its own)
        raise ConfigError(f"{config_file}: {type(exc).__name__}: {exc}") from exc


class FeatureFetcher:
    """Online feature lookups for entity-keyed requests.

    Build it in the process that serves (a Ray replica): the Feast store holds
    open connections and is never pickled. Thread-safe: lookups may run in
    worker threads; a SQLite online store (one shared connection) is used by one
    thread at a time.
    """

    def __init__(self, repo_path: str | Path, fs_yaml: str | Path | None = None) -> None:
        self.repo_path = resolve_feature_repo(repo_path)
        self.fs_yaml = resolve_fs_yaml(self.repo_path, fs_yaml)
        self.store = open_feature_store(self.repo_path, self.fs_yaml)
        config = self.store.config
        self.project: str = config.project
        self.online_store_type: str = str(getattr(config.online_store, "type", "sqlite"))
        # Feast's SQLite store shares one connection (check_same_thread=False) between
        # threads; Redis goes through redis-py's thread-safe connection pool.
        self._store_lock: threading.Lock | None = (
            threading.Lock() if self.online_store_type.endswith("sqlite") else None
        )
        if self.online_store_type.endswith("redis"):
            self._bound_redis_retries()
        # Follow registry changes as often as Feast's own registry cache does.
        ttl = int(getattr(config.registry, "cache_ttl_seconds", 60) or 0)
        self._views_ttl_s = float(ttl) if ttl > 0 else float("inf")
        self._views_lock = threading.Lock()
        self._views: dict[str, _View] = {}
        self._views_loaded_at = float("-inf")
        self._load_views()

    def __reduce__(self) -> NoReturn:
        raise TypeError("FeatureFetcher holds live store connections; build it in the "
                        "process that uses it")

    def _bound_redis_retries(self) -> None:
        """One quick retry instead of redis-py 7's default of three with exponential
        backoff (1, 2, 4 s + jitter): measured here, a Redis that refused connections
        took 11.5 s to fail a lookup with the default, ~25 ms with this. The socket
        timeouts come from the connection string (see feature_store.production.yaml)."""
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        online_store = self.store._get_provider().online_store
        get_client = getattr(online_store, "_get_client", None)
        if get_client is None:  # not Feast's RedisOnlineStore: leave it alone
            return
        client = get_client(self.store.config.online_store)  # lazy: no connection yet
        if hasattr(client, "set_retry"):
            client.set_retry(Retry(ExponentialBackoff(cap=0.1, base=0.02), 1))

    # -- metadata -------------------------------------------------------------------------

    def join_keys(self, features: list[str]) -> dict[str, str]:
        """Entity key field -> Feast value type name, over the views of ``features``.

        ``InvalidInput`` names a malformed reference, an unknown view or feature.
        """
        keys: dict[str, str] = {}
        for view in self._views_of(features):
            keys.update(view.join_keys)
        return keys

    def refresh(self) -> None:
        """Re-read the registry now (after an ``apply``), not at the next cache expiry."""
        self.store.refresh_registry()
        self._load_views()

    def _load_views(self) -> None:
        try:
            views = self.store.list_feature_views(allow_cache=True)
        except Exception as exc:
            raise DependencyUnavailable(f"feature registry unreadable: {exc}",
                                        retry_after_s=1) from exc
        loaded: dict[str, _View] = {}
        for fv in views:
            loaded[fv.name] = _View(
                name=fv.name,
                features={f.name: f.dtype.to_value_type().name for f in fv.features},
                join_keys={c.name: c.dtype.to_value_type().name for c in fv.entity_columns},
            )
        with self._views_lock:
            self._views = loaded
            self._views_loaded_at = time.monotonic()

    def _views_of(self, features: list[str]) -> list[_View]:
        """The distinct views ``features`` reference, in first-use order."""
        if not isinstance(features, list) or not features:
            raise InvalidInput("features: expected a non-empty list of 'view:feature' names")
        parsed: list[tuple[int, str, str]] = []
        seen: set[str] = set()
        for i, ref in enumerate(features):
            if not isinstance(ref, str) or ref.count(":") != 1:
                raise InvalidInput(f"features[{i}]: expected 'view:feature', got {ref!r}")
            if ref in seen:
                raise InvalidInput(f"features[{i}]: {ref!r} is listed twice")
            seen.add(ref)
            view_name, feature = ref.split(":")
            parsed.append((i, view_name, feature))
        views = self._known_views(view for _, view, _ in parsed)
        used: dict[str, _View] = {}
        for i, view_name, feature in parsed:
            view = views.get(view_name)
            if view is None:
                raise InvalidInput(f"features[{i}]: unknown feature view {view_name!r} "
                                   f"(the store has {sorted(views)})")
            if feature not in view.features:
                raise InvalidInput(f"features[{i}]: feature view {view_name!r} has no feature "
                                   f"{feature!r} (it has {sorted(view.features)})")
            used.setdefault(view_name, view)
        return list(used.values())

    def _known_views(self, names: Iterator[str]) -> dict[str, _View]:
        age = time.monotonic() - self._views_loaded_at
        # Re-read the registry when our copy is as old as Feast's cache, or (at most once
        # a second) when a request names a view we do not know: it may have been applied
        # since start-up.
        if age > self._views_ttl_s or (age > 1.0 and any(n not in self._views for n in names)):
            self._load_views()
        return self._views

    # -- validation -----------------------------------------------------------------------

    def validate(self, entities: list[dict[str, Any]], features: list[str]) -> None:
        """``InvalidInput`` naming the first bad field of the request, else nothing."""
        keys = self.join_keys(features)
        _validate_entities(entities, keys)

    # -- lookups --------------------------------------------------------------------------

    def lookup(self, entities: list[dict[str, Any]], features: list[str]) -> FeatureRows:
        """The features of ``entities``, columns in the order of ``features``."""
        result = self.lookup_many([(entities, features)])[0]
        if isinstance(result, KeelError):
            raise result
        return result

    def lookup_many(
        self, requests: list[tuple[list[dict[str, Any]], list[str]]]
    ) -> list[FeatureRows | KeelError]:
        """Answer many lookups with one store call per distinct feature list.

        Each request gets its rows or its own error: an invalid request or a missing
        entity fails only that request. A store error fails every request not yet
        answered with ``DependencyUnavailable`` (the store is not asked again).
        """
        results: list[FeatureRows | KeelError | None] = [None] * len(requests)
        groups: dict[tuple[str, ...], list[int]] = {}
        views_of: dict[tuple[str, ...], list[_View]] = {}
        for i, (entities, features) in enumerate(requests):
            try:
                views = self._views_of(features)
                keys: dict[str, str] = {}
                for view in views:
                    keys.update(view.join_keys)
                _validate_entities(entities, keys)
            except KeelError as exc:
                results[i] = exc
                continue
            if not entities:
                results[i] = FeatureRows(np.zeros((0, len(features)), dtype=np.float32),
                                         {view.name: [] for view in views})
                continue
            group = tuple(features)
            groups.setdefault(group, []).append(i)
            views_of[group] = views

        failure: DependencyUnavailable | None = None
        for group, members in groups.items():
            if failure is not None:
                for i in members:
                    results[i] = failure
                continue
            merged = [entity for i in members for entity in requests[i][0]]
            try:
                table = self._fetch(merged, list(group), views_of[group])
            except DependencyUnavailable as exc:
                failure = exc
                for i in members:
                    results[i] = exc
                continue
            offset = 0
            for i in members:
                count = len(requests[i][0])
                try:
                    results[i] = table.rows(offset, count, requests[i][0])
                except EntityNotFound as exc:
                    results[i] = exc
                offset += count
        return [r if r is not None else DependencyUnavailable("lookup not answered")
                for r in results]

    def warm_up(self) -> float:
        """One throw-away lookup per feature view, so the first real request does not pay
        Feast's lazy imports and connections (measured: 3.4 s on the first lookup of a
        fresh replica). Returns the seconds it took; a failure is logged, not raised: the
        store may come up later."""
        started = time.perf_counter()
        for view in list(self._views.values()):
            if not view.features or not view.join_keys:
                continue
            feature = f"{view.name}:{next(iter(view.features))}"
            probe = {key: "__keel_warm_up__" if kind == "STRING" else 0
                     for key, kind in view.join_keys.items()}
            try:
                self._fetch([probe], [feature], [view])
            except KeelError as exc:
                logger.warning("feature store warm-up failed: %s", exc.message)
                break
        return time.perf_counter() - started

    def _fetch(self, entities: list[dict[str, Any]], features: list[str],
               views: list[_View]) -> _FetchedTable:
        """One ``get_online_features`` call, parsed; store failures → DependencyUnavailable."""
        keys = {key for view in views for key in view.join_keys}
        # Columnar rows skip Feast's own list-of-dicts conversion.
        columns = {key: [entity[key] for entity in entities] for key in keys}
        try:
            if self._store_lock is not None:
                with self._store_lock:
                    response = self.store.get_online_features(
                        features=features, entity_rows=columns, full_feature_names=True)
            else:
                response = self.store.get_online_features(
                    features=features, entity_rows=columns, full_feature_names=True)
        except KeelError:
            raise
        except Exception as exc:
            logger.warning("feature store lookup failed: %s: %s", type(exc).__name__, exc)
            raise DependencyUnavailable(
                f"feature store unavailable ({self.online_store_type}): "
                f"{type(exc).__name__}: {exc}", retry_after_s=1
            ) from exc
        return _FetchedTable.parse(response.proto, features, views)


@dataclass
class _FetchedTable:
    """A parsed online response over the merged entity rows of one feature list."""

    features: list[str]
    views: list[_View]
    values: np.ndarray
    #: Per (column) the FieldStatus of every row.
    statuses: list[list[int]]
    #: Per view: the event time of each row.
    timestamps: dict[str, list[float]]

    @classmethod
    def parse(cls, proto: Any, features: list[str], views: list[_View]) -> _FetchedTable:
        names = list(proto.metadata.feature_names.val)
        index = {name: i for i, name in enumerate(names)}
        n_rows = len(proto.results[0].values) if proto.results else 0
        values = np.empty((n_rows, len(features)), dtype=np.float32)
        statuses: list[list[int]] = []
        timestamps: dict[str, list[float]] = {}
        for col, ref in enumerate(features):
            view_name, feature = ref.split(":")
            vector = proto.results[index[f"{view_name}__{feature}"]]
            column_status = list(vector.statuses)
            column: list[float] = []
            for row, value in enumerate(vector.values):
                kind = value.WhichOneof("val")
                if kind is None:
                    if column_status[row] in (_PRESENT, _OUTSIDE_MAX_AGE):
                        column_status[row] = _NULL_VALUE
                    column.append(np.nan)
                else:
                    column.append(getattr(value, kind))
            values[:, col] = column
            statuses.append(column_status)
            if view_name not in timestamps:
                timestamps[view_name] = [ts.seconds + ts.nanos * 1e-9
                                         for ts in vector.event_timestamps]
        return cls(features, views, values, statuses, timestamps)

    def rows(self, offset: int, count: int, entities: list[dict[str, Any]]) -> FeatureRows:
        """The rows of one request; ``EntityNotFound`` for its first missing entity."""
        end = offset + count
        for view in self.views:
            first_col = next(c for c, ref in enumerate(self.features)
                             if ref.split(":")[0] == view.name)
            status = self.statuses[first_col]
            for row in range(offset, end):
                if status[row] == _NOT_FOUND:
                    raise EntityNotFound(
                        f"entities[{row - offset}]: {_describe(entities[row - offset], view)} "
                        f"is not in the feature store (view {view.name})"
                    )
        for col, ref in enumerate(self.features):
            status = self.statuses[col]
            for row in range(offset, end):
                if status[row] not in (_PRESENT, _OUTSIDE_MAX_AGE):
                    view = next(v for v in self.views if v.name == ref.split(":")[0])
                    raise EntityNotFound(
                        f"entities[{row - offset}]: {_describe(entities[row - offset], view)} "
                        f"has no value for {ref!r} in the feature store"
                    )
        return FeatureRows(
            values=self.values[offset:end].copy(),
            event_timestamps={view: stamps[offset:end]
                              for view, stamps in self.timestamps.items()},
        )


def _describe(entity: dict[str, Any], view: _View) -> str:
    return ", ".join(f"{key} {quoted(entity.get(key))}" for key in view.join_keys)


# Python types accepted for a Feast value type; bool is an int subclass, so it is
# excluded explicitly from the numeric types.
_ACCEPTED: dict[str, tuple[tuple[type, ...], str]] = {
    "STRING": ((str,), "a string"),
    "INT64": ((int,), "an integer"),
    "INT32": ((int,), "an integer"),
    "UNIX_TIMESTAMP": ((int,), "an integer"),
    "DOUBLE": ((float, int), "a number"),
    "FLOAT": ((float, int), "a number"),
    "BOOL": ((bool,), "a boolean"),
    "BYTES": ((bytes,), "bytes"),
}


def _validate_entities(entities: list[dict[str, Any]], keys: dict[str, str]) -> None:
    if not isinstance(entities, list):
        raise InvalidInput(f"entities: expected a list of objects, got {type(entities).__name__}")
    for i, entity in enumerate(entities):
        if not isinstance(entity, dict):
            raise InvalidInput(f"entities[{i}]: expected an object with {sorted(keys)}, "
                               f"got {type(entity).__name__}")
        for key, value_type in keys.items():
            if key not in entity or entity[key] is None:
                raise InvalidInput(f"entities[{i}].{key}: missing")
            value = entity[key]
            accepted = _ACCEPTED.get(value_type)
            if accepted is None:
                continue
            types, label = accepted
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                raise InvalidInput(f"entities[{i}].{key}: expected {label}, "
                                   f"got {type(value).__name__}")
        for key in entity:
            if key not in keys:
                # A plain name as is; anything else quoted (escaped and cut short).
                shown = key if key.isidentifier() and len(key) <= 64 else quoted(key)
                raise InvalidInput(f"entities[{i}].{shown}: not an entity key of the "
                                   f"requested features (expected {sorted(keys)})")


def _strings(node: Any) -> Sequence[str]:
    """Every string value in a parsed YAML tree."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return []


__all__ = [
    "FeatureFetcher",
    "FeatureRows",
    "FeatureServiceConfig",
    "open_feature_store",
    "require_env",
    "resolve_feature_repo",
    "resolve_fs_yaml",
    "unset_env_references",
]
