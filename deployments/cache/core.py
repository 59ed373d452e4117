"""The prediction cache: one key per input row, Redis first, an in-process LRU behind it.

No Ray here. ``row_keys`` derives a key per row from the model name and version,
each input's name, datatype and per-row shape, and the row's canonical bytes, so
a new model version never meets an old answer. ``PredictionCache.fetch`` looks
all of a request's keys up with one ``MGET``, sends only the misses to the
model, writes them back with one pipeline, and makes concurrent identical misses
compute once (single-flight). Redis down or slow is a cache miss and a counted,
rate-limited log line, never an error: the bounded in-process LRU+TTL stands in
until Redis answers again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import blake3
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deployments.settings import RedisSettings

log = logging.getLogger(__name__)

HashName = Literal["blake3", "sha256"]
CacheStatus = Literal["hit", "miss", "shared"]


class CacheConfig(BaseModel):
    """Live knobs of the prediction cache (part of the ingress's ``user_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    #: How long an answer stays cached. Answers are keyed by model version, so a TTL only
    #: bounds memory and how long a retired version's answers linger.
    ttl_s: float = Field(default=600.0, gt=0, le=30 * 24 * 3600)
    hash: HashName = "blake3"
    key_prefix: str = Field(default="keel:pred:", max_length=64)
    #: The in-process fallback's bound (entries) while Redis is unreachable.
    local_max_entries: int = Field(default=10_000, ge=0, le=10_000_000)
    #: After a Redis failure, how long to serve from the fallback before trying again.
    retry_after_s: float = Field(default=2.0, ge=0, le=600)
    #: At most one "Redis unreachable" log line per this interval.
    log_interval_s: float = Field(default=30.0, ge=0)


# --- keys ------------------------------------------------------------------------------


def row_keys(model: str, version: str, inputs: dict[str, np.ndarray], *,
             hash_name: HashName = "blake3", prefix: str = "") -> list[str]:
    """One key per row of the first axis, over everything that decides the answer.

    Inputs are taken in name order; each contributes its name, dtype (little-endian),
    per-row shape and the row's bytes, each length-prefixed so no two different
    requests can produce the same byte stream.
    """
    if not inputs:
        raise ValueError("no inputs")
    names = sorted(inputs)
    rows = {inputs[n].shape[0] if inputs[n].ndim else 1 for n in names}
    if len(rows) != 1:
        raise ValueError(f"inputs disagree on the number of rows: {sorted(rows)}")
    n_rows = rows.pop()
    head = _frame(model.encode()) + _frame(version.encode())
    prepared = []
    for name in names:
        array = inputs[name]
        if array.ndim == 0:
            array = array.reshape(1)
        if array.dtype.kind == "O":
            raise ValueError(f"input {name!r}: object arrays are not cacheable")
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        little = np.ascontiguousarray(little)
        meta = _frame(name.encode()) + _frame(little.dtype.str.encode()) + _frame(
            json.dumps(list(little.shape[1:])).encode())
        prepared.append((meta, little))
    keys = []
    for i in range(n_rows):
        digest = hasher(hash_name)
        digest.update(head)
        for meta, little in prepared:
            digest.update(meta)
            digest.update(_frame(little[i].tobytes()))
        keys.append(prefix + digest.hexdigest())
    return keys


def _frame(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def hasher(name: HashName) -> Any:
    """A fresh BLAKE3 or SHA-256 hasher (``update``/``hexdigest``); the prompt cache uses it too."""
    if name == "blake3":
        return blake3.blake3()
    if name == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash {name!r}")


# --- values ----------------------------------------------------------------------------

_MAGIC = b"KPC1"


def encode_row(outputs: dict[str, np.ndarray]) -> bytes:
    """One row's outputs as bytes: a small JSON header and the raw little-endian data.

    Never pickle: a cache that anyone can write to must not be able to run code here.
    """
    header = []
    blobs = []
    for name, value in outputs.items():
        if value.dtype.kind == "O":
            raise ValueError(f"output {name!r}: object arrays are not cacheable")
        # astype(order="C") keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d).
        little = value.astype(value.dtype.newbyteorder("<"), order="C", copy=False)
        blob = little.tobytes()
        header.append({"n": name, "d": little.dtype.str, "s": list(little.shape),
                       "b": len(blob)})
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    return _MAGIC + struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode_row(data: bytes) -> dict[str, np.ndarray]:
    """The inverse of ``encode_row``; any damage raises ``ValueError``."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
        raise ValueError("not a Keel cache entry")
    (head_len,) = struct.unpack_from("<I", data, len(_MAGIC))
    start = len(_MAGIC) + 4
    try:
        header = json.loads(data[start:start + head_len])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"damaged cache entry header: {exc}") from exc
    if not isinstance(header, list):
        raise ValueError("damaged cache entry header")
    pos = start + head_len
    outputs: dict[str, np.ndarray] = {}
    try:
        for entry in header:
            size = int(entry["b"])
            dtype = np.dtype(entry["d"])
            if dtype.kind == "O":
                raise ValueError("object dtype in a cache entry")
            blob = data[pos:pos + size]
            if len(blob) != size:
                raise ValueError("truncated cache entry")
            pos += size
            outputs[str(entry["n"])] = np.frombuffer(blob, dtype=dtype).reshape(
                [int(d) for d in entry["s"]]).astype(dtype.newbyteorder("="))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"damaged cache entry: {exc}") from exc
    if pos != len(data):
        raise ValueError("trailing bytes in a cache entry")
    return outputs


# --- stores ----------------------------------------------------------------------------


class LocalStore:
    """A bounded in-process LRU with per-entry expiry: the fallback when Redis is away."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self._clock()
        out: list[bytes | None] = []
        for key in keys:
            item = self._data.get(key)
            if item is None or item[0] <= now:
                if item is not None:
                    del self._data[key]
                out.append(None)
                continue
            self._data.move_to_end(key)
            out.append(item[1])
        return out

    def set_many(self, items: dict[str, bytes], ttl_s: float) -> None:
        if self.max_entries <= 0:
            return
        expires = self._clock() + ttl_s
        for key, value in items.items():
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)


class RemoteStore:
    """What ``PredictionCache`` needs of Redis (``redis.asyncio.Redis`` has it)."""

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        raise NotImplementedError

    async def set_many(self, items: dict[str, bytes], ttl_s: float) -> None:
        raise NotImplementedError


class RedisStore(RemoteStore):
    """Redis via redis.asyncio: one MGET per lookup, one pipeline per write-back."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        values: list[bytes | None] = await self.client.mget(list(keys))
        return values

    async def set_many(self, items: dict[str, bytes], ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        async with self.client.pipeline(transaction=False) as pipe:
            for key, value in items.items():
                pipe.set(key, value, px=ttl_ms)
            await pipe.execute()


def redis_store(url: str, *, password: str | None = None, ssl_ca_certs: str | None = None,
                socket_timeout_s: float = 0.1, connect_timeout_s: float = 0.5) -> RedisStore:
    """A ``RedisStore`` for a ``redis://`` or ``rediss://`` URL (hiredis parses replies)."""
    import redis.asyncio as aioredis

    options: dict[str, Any] = {"socket_timeout": socket_timeout_s,
                               "socket_connect_timeout": connect_timeout_s,
                               "retry_on_timeout": False}
    if password:
        options["password"] = password
    if url.startswith("rediss://") and ssl_ca_certs:
        options["ssl_ca_certs"] = ssl_ca_certs
    return RedisStore(aioredis.Redis.from_url(url, **options))


def redis_store_from_env(settings: RedisSettings | None = None) -> RedisStore | None:
    """The ``RedisStore`` the environment names (``KEEL_REDIS_URL``, ``_PASSWORD``,
    ``_SSL_CA_CERTS``, timeouts); ``None`` when ``KEEL_REDIS_URL`` is empty."""
    settings = settings or RedisSettings()
    if not settings.url:
        return None
    return redis_store(settings.url,
                       password=settings.password.get_secret_value() if settings.password
                       else None,
                       ssl_ca_certs=settings.ssl_ca_certs,
                       socket_timeout_s=settings.socket_timeout_s,
                       connect_timeout_s=settings.connect_timeout_s)


def redacted(url: str) -> str:
    """The URL without credentials (``redis://:secret@host`` → ``redis://***@host``)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


# --- the cache -------------------------------------------------------------------------


@dataclass
class CacheCounters:
    """Monotonic counts, per model; the metrics layer exports them."""

    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    shared: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    corrupt: int = 0

    def add(self, bucket: dict[str, int], model: str, n: int) -> None:
        if n:
            bucket[model] = bucket.get(model, 0) + n

    def hit_ratio(self, model: str) -> float | None:
        hits = self.hits.get(model, 0) + self.shared.get(model, 0)
        total = hits + self.misses.get(model, 0)
        return hits / total if total else None


Compute = Callable[[list[int]], Awaitable[list[dict[str, np.ndarray]]]]


class CacheObserver:
    """Told about every lookup and every Redis failure (the metrics layer subclasses it)."""

    def rows(self, model: str, hits: int, misses: int, shared: int) -> None:
        """One request's rows: from the cache, computed, computed by a concurrent request."""

    def remote_failed(self, operation: str) -> None:
        """A Redis command failed; the in-process fallback answers meanwhile."""


class ByteCache:
    """Bytes by key: Redis first, the bounded in-process LRU+TTL while Redis is away.

    The one cache layer under both the prediction cache and the LLM prompt cache. A
    Redis failure is a miss (or a local write), counted, logged at most once per
    ``log_interval_s``; Redis is not asked again for ``retry_after_s``.
    """

    def __init__(self, remote: RemoteStore | None, *, local_max_entries: int = 10_000,
                 retry_after_s: float = 2.0, log_interval_s: float = 30.0,
                 name: str = "cache", clock: Callable[[], float] = time.monotonic,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.remote = remote
        self.local = LocalStore(local_max_entries, clock)
        self.retry_after_s = retry_after_s
        self.log_interval_s = log_interval_s
        self.name = name
        self.errors = 0
        #: Called with the Redis operation that failed (metrics, counters).
        self.on_failure = on_failure
        self._clock = clock
        self._remote_down_until = 0.0
        self._last_log = float("-inf")

    def reconfigure(self, *, local_max_entries: int, retry_after_s: float,
                    log_interval_s: float) -> None:
        self.local.max_entries = local_max_entries
        self.retry_after_s = retry_after_s
        self.log_interval_s = log_interval_s

    @property
    def remote_available(self) -> bool:
        return self.remote is not None and self._clock() >= self._remote_down_until

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if self.remote_available:
            assert self.remote is not None
            try:
                return await self.remote.mget(keys)
            except Exception as exc:  # any Redis or socket failure is a miss, never a 5xx
                self.remote_failed("MGET", exc)
        return self.local.get_many(keys)

    async def set_many(self, items: dict[str, bytes], ttl_s: float) -> None:
        if not items:
            return
        if self.remote_available:
            assert self.remote is not None
            try:
                await self.remote.set_many(items, ttl_s)
                return
            except Exception as exc:  # see get_many
                self.remote_failed("SET", exc)
        self.local.set_many(items, ttl_s)

    def remote_failed(self, what: str, exc: Exception) -> None:
        """Count a Redis failure, log it (rate-limited) and stop asking for a while."""
        self.errors += 1
        if self.on_failure is not None:
            self.on_failure(what)
        now = self._clock()
        self._remote_down_until = now + self.retry_after_s
        if now - self._last_log >= self.log_interval_s:
            self._last_log = now
            log.warning("%s: Redis %s failed (%s: %s); serving from the in-process cache, "
                        "retrying in %.1f s (errors so far: %d)", self.name, what,
                        type(exc).__name__, exc, self.retry_after_s, self.errors)


class PredictionCache:
    """Per-row answers in Redis (or the in-process fallback), with single-flight misses."""

    def __init__(self, remote: RemoteStore | None, config: CacheConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or CacheConfig()
        self.store = ByteCache(remote, local_max_entries=self.config.local_max_entries,
                               retry_after_s=self.config.retry_after_s,
                               log_interval_s=self.config.log_interval_s,
                               name="prediction cache", clock=clock,
                               on_failure=self._remote_failed)
        self.counters = CacheCounters()
        self._inflight: dict[str, asyncio.Future[dict[str, np.ndarray]]] = {}
        self.observer = CacheObserver()

    @property
    def remote(self) -> RemoteStore | None:
        return self.store.remote

    @property
    def local(self) -> LocalStore:
        return self.store.local

    def reconfigure(self, config: CacheConfig) -> None:
        self.config = config
        self.store.reconfigure(local_max_entries=config.local_max_entries,
                               retry_after_s=config.retry_after_s,
                               log_interval_s=config.log_interval_s)

    @property
    def remote_available(self) -> bool:
        return self.store.remote_available

    def keys(self, model: str, version: str, inputs: dict[str, np.ndarray]) -> list[str]:
        return row_keys(model, version, inputs, hash_name=self.config.hash,
                        prefix=self.config.key_prefix)

    async def fetch(self, model: str, keys: list[str],
                    compute: Compute) -> tuple[list[dict[str, np.ndarray]], list[CacheStatus]]:
        """Each row's outputs, from the cache where possible; ``compute`` gets the rest.

        ``compute`` receives the row indices to compute and returns their outputs in
        that order. Rows another request is already computing are awaited, not
        recomputed. An exception from ``compute`` reaches every request waiting on it.
        """
        n = len(keys)
        if not self.config.enabled:
            return await compute(list(range(n))), ["miss"] * n
        results: list[dict[str, np.ndarray] | None] = [None] * n
        statuses: list[CacheStatus] = ["miss"] * n
        for i, raw in enumerate(await self._get_many(keys)):
            if raw is None:
                continue
            try:
                results[i] = decode_row(raw)
                statuses[i] = "hit"
            except ValueError:
                self.counters.corrupt += 1  # a poisoned entry is a miss and gets overwritten
        leaders: dict[str, list[int]] = {}
        waits: dict[str, tuple[asyncio.Future[dict[str, np.ndarray]], list[int]]] = {}
        for i, key in enumerate(keys):
            if results[i] is not None:
                continue
            if key in leaders:
                leaders[key].append(i)
            elif key in waits:
                waits[key][1].append(i)
            elif key in self._inflight:
                waits[key] = (self._inflight[key], [i])
            else:
                leaders[key] = [i]
        owned: dict[str, asyncio.Future[dict[str, np.ndarray]]] = {}
        loop = asyncio.get_running_loop()
        for key in leaders:
            owned[key] = self._inflight[key] = loop.create_future()
        try:
            if leaders:
                first_rows = [rows[0] for rows in leaders.values()]
                computed = await compute(first_rows)
                if len(computed) != len(first_rows):
                    raise RuntimeError("compute returned the wrong number of rows")
                fresh: dict[str, bytes] = {}
                for (key, rows), outputs in zip(leaders.items(), computed, strict=True):
                    for i in rows:
                        results[i] = outputs
                    owned[key].set_result(outputs)
                    fresh[key] = encode_row(outputs)
                await self._set_many(fresh)
        except BaseException as exc:
            for future in owned.values():
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()  # this request went away: its waiters compute themselves
                else:
                    future.set_exception(exc)
                    future.exception()  # retrieved here: waiters re-raise it themselves
            raise
        finally:
            for key, future in owned.items():
                if self._inflight.get(key) is future:
                    del self._inflight[key]
        abandoned: dict[str, list[int]] = {}
        for key, (future, rows) in waits.items():
            try:
                outputs = await asyncio.shield(future)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not future.cancelled() or (task is not None and task.cancelling()):
                    raise  # this request itself was cancelled
                abandoned[key] = rows
                continue
            for i in rows:
                results[i] = outputs
                statuses[i] = "shared"
        if abandoned:
            # The request computing these rows was cancelled (its client left, or its time
            # ran out): compute them here rather than fail a second request with it.
            computed = await compute([rows[0] for rows in abandoned.values()])
            for rows, outputs in zip(abandoned.values(), computed, strict=True):
                for i in rows:
                    results[i] = outputs
            await self._set_many({key: encode_row(outputs)
                                  for key, outputs in zip(abandoned, computed, strict=True)})
        hits, misses, shared = (statuses.count("hit"), statuses.count("miss"),
                                statuses.count("shared"))
        self.counters.add(self.counters.hits, model, hits)
        self.counters.add(self.counters.misses, model, misses)
        self.counters.add(self.counters.shared, model, shared)
        self.observer.rows(model, hits, misses, shared)
        return [r for r in results if r is not None], statuses

    async def _get_many(self, keys: list[str]) -> list[bytes | None]:
        return await self.store.get_many(keys)

    async def _set_many(self, items: dict[str, bytes]) -> None:
        await self.store.set_many(items, self.config.ttl_s)

    def _remote_failed(self, what: str) -> None:
        self.counters.errors += 1
        self.observer.remote_failed(what)
