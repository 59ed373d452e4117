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
from typing import Any, Literal, Protocol

import blake3
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deployments.background import AfterAnswer
from deployments.contracts import CacheStatus
from deployments.settings import RedisSettings

log = logging.getLogger(__name__)

HashName = Literal["blake3", "sha256"]
CachePolicy = Literal["auto", "always", "never"]


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
    #: When a model's rows go through the cache: ``auto`` only while a lookup is measured
    #: to cost less than computing them (a model cheaper than a Redis round trip skips
    #: it), ``always``, or ``never``. ``models`` sets it per model.
    policy: CachePolicy = "auto"
    models: dict[str, CachePolicy] = Field(default_factory=dict)
    #: Under ``auto``, how often a skipping model sends one request through the cache
    #: anyway, to measure the lookup again.
    probe_interval_s: float = Field(default=10.0, gt=0, le=3600)

    def policy_of(self, model: str) -> CachePolicy:
        return self.models.get(model, self.policy)


# --- keys ------------------------------------------------------------------------------


def row_keys(model: str, version: str, inputs: dict[str, np.ndarray], *,
             hash_name: HashName = "blake3", prefix: str = "") -> list[str]:
    """One key per row of the first axis, over everything that decides the answer.

    The head (model, version, and per input in name order: its name, little-endian
    dtype and per-row shape, each length-prefixed) fixes every row's byte length, so
    head + the row's bytes of every input can never be produced by another request.
    The rows' bytes are laid out as one matrix; the only per-row work is the hash.
    """
    if not inputs:
        raise ValueError("no inputs")
    names = sorted(inputs)
    rows = {inputs[n].shape[0] if inputs[n].ndim else 1 for n in names}
    if len(rows) != 1:
        raise ValueError(f"inputs disagree on the number of rows: {sorted(rows)}")
    n_rows = rows.pop()
    head = _frame(model.encode()) + _frame(version.encode())
    parts = []
    for name in names:
        array = inputs[name]
        if array.ndim == 0:
            array = array.reshape(1)
        if array.dtype.kind == "O":
            raise ValueError(f"input {name!r}: object arrays are not cacheable")
        little = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
        head += _frame(name.encode()) + _frame(little.dtype.str.encode()) + _frame(
            json.dumps(list(little.shape[1:])).encode())
        parts.append(little.reshape(n_rows, -1).view(np.uint8))
    matrix = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    if hash_name == "blake3":
        return [prefix + blake3.blake3(head + row).hexdigest() for row in _row_bytes(matrix)]
    return [prefix + hashlib.sha256(head + row).hexdigest() for row in _row_bytes(matrix)]


def _row_bytes(matrix: np.ndarray) -> list[bytes]:
    """Each row of a C-contiguous 2-D uint8 matrix as bytes (one slice of one buffer)."""
    data = np.ascontiguousarray(matrix).tobytes()
    width = matrix.shape[1] if matrix.ndim == 2 else 0
    return [data[i * width:(i + 1) * width] for i in range(matrix.shape[0])]


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
    return encode_rows({name: np.asarray(value)[None] for name, value in outputs.items()})[0]


def encode_rows(outputs: dict[str, np.ndarray]) -> list[bytes]:
    """Every row (first axis) of ``outputs`` encoded as ``encode_row`` would: the header is
    built once, the rows' data laid out as one matrix."""
    header = []
    parts = []
    n_rows = None
    for name, value in outputs.items():
        if value.dtype.kind == "O":
            raise ValueError(f"output {name!r}: object arrays are not cacheable")
        n_rows = value.shape[0] if n_rows is None else n_rows
        if value.shape[0] != n_rows:
            raise ValueError("outputs disagree on the number of rows")
        little = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("<"), copy=False))
        header.append({"n": name, "d": little.dtype.str, "s": list(little.shape[1:]),
                       "b": little[0:1].nbytes if n_rows else 0})
        parts.append(little.reshape(n_rows, -1).view(np.uint8))
    if n_rows is None:
        raise ValueError("no outputs")
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = _MAGIC + struct.pack("<I", len(head)) + head
    matrix = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return [prefix + row for row in _row_bytes(matrix)]


_Layout = list[tuple[str, np.dtype[Any], tuple[int, ...], int]]
#: Parsed headers by their bytes: every row of one model version shares one.
_LAYOUTS: dict[bytes, _Layout] = {}


def _layout(head: bytes) -> _Layout:
    layout = _LAYOUTS.get(head)
    if layout is not None:
        return layout
    try:
        header = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"damaged cache entry header: {exc}") from exc
    if not isinstance(header, list):
        raise ValueError("damaged cache entry header")
    layout = []
    try:
        for entry in header:
            dtype = np.dtype(entry["d"])
            if dtype.kind == "O":
                raise ValueError("object dtype in a cache entry")
            shape = tuple(int(d) for d in entry["s"])
            size = int(entry["b"])
            if size != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise ValueError("cache entry sizes disagree")
            layout.append((str(entry["n"]), dtype, shape, size))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"damaged cache entry: {exc}") from exc
    if len(_LAYOUTS) >= 1024:
        _LAYOUTS.clear()
    _LAYOUTS[head] = layout
    return layout


def decode_row(data: bytes) -> dict[str, np.ndarray]:
    """The inverse of ``encode_row``; any damage raises ``ValueError``."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
        raise ValueError("not a Keel cache entry")
    (head_len,) = struct.unpack_from("<I", data, len(_MAGIC))
    start = len(_MAGIC) + 4
    layout = _layout(bytes(data[start:start + head_len]))
    pos = start + head_len
    outputs: dict[str, np.ndarray] = {}
    for name, dtype, shape, size in layout:
        blob = data[pos:pos + size]
        if len(blob) != size:
            raise ValueError("truncated cache entry")
        pos += size
        outputs[name] = np.frombuffer(blob, dtype=dtype).reshape(shape).astype(
            dtype.newbyteorder("="))
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
        #: Entries pushed out to stay within ``max_entries`` (expired ones not counted).
        self.evictions = 0

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
            self.evictions += 1


#: One Redis command and its arguments, as Redis spells it: ``("HINCRBY", key, field, 1)``.
RedisCommand = tuple[str | bytes | int | float, ...]


class RemoteStore:
    """What ``PredictionCache`` needs of Redis (``redis.asyncio.Redis`` has it)."""

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        raise NotImplementedError

    async def set_many(self, items: dict[str, bytes], ttl_s: float) -> None:
        raise NotImplementedError

    async def execute(self, commands: Sequence[RedisCommand]) -> list[Any]:
        """Run ``commands`` in one round trip (a pipeline, not a transaction); their
        replies in order, parsed as redis-py parses them (``HINCRBYFLOAT`` a float,
        ``PFCOUNT`` an int, ``HGETALL`` a dict, ``SMEMBERS`` a set)."""
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

    async def execute(self, commands: Sequence[RedisCommand]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Any] = await pipe.execute()
            return replies


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


#: Computes the rows at the given indices: every output with those rows, in that order.
Compute = Callable[[list[int]], Awaitable[dict[str, np.ndarray]]]


class CacheObserver(Protocol):
    """Told about every lookup and every Redis failure (the metrics layer)."""

    def rows(self, model: str, hits: int, misses: int, shared: int, lookup_ms: float,
             version: str = "") -> None:
        """One request's rows of one model version: from the cache, computed, computed by a
        concurrent request; and how long looking them up took (in-process layer, Redis,
        decoding)."""

    def stored(self, model: str, write_ms: float, local_entries: int, evictions: int) -> None:
        """One write-back done (after the answer): how long it took, the in-process
        layer's size now and how many entries it evicted since the last write-back."""

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
                 on_failure: Callable[[str], None] | None = None,
                 local_first: bool = False) -> None:
        self.remote = remote
        #: Ask the in-process LRU before Redis, and keep what Redis answers there too
        #: (safe for entries that never change under their key, like version-keyed rows).
        self.local_first = local_first
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

    async def get_many(self, keys: list[str], ttl_s: float | None = None
                       ) -> list[bytes | None]:
        """Values of ``keys`` (``None`` for a miss). ``ttl_s``: how long a value Redis
        answered stays in the in-process layer (``local_first`` only)."""
        if not self.local_first or not self.remote_available:
            return await self._remote_then_local(keys)
        values = self.local.get_many(keys)
        missing = [i for i, v in enumerate(values) if v is None]
        if not missing:
            return values
        remote = await self._remote_then_local([keys[i] for i in missing])
        found: dict[str, bytes] = {}
        for i, value in zip(missing, remote, strict=True):
            if value is not None:
                values[i] = found[keys[i]] = value
        if found and ttl_s is not None:
            self.local.set_many(found, ttl_s)
        return values

    async def _remote_then_local(self, keys: list[str]) -> list[bytes | None]:
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
        if self.local_first:
            self.local.set_many(items, ttl_s)
        await self.set_remote(items, ttl_s)

    async def set_remote(self, items: dict[str, bytes], ttl_s: float) -> None:
        """Write to Redis only (the in-process layer when Redis fails and it is a
        fallback, not a front)."""
        if self.remote_available:
            assert self.remote is not None
            try:
                await self.remote.set_many(items, ttl_s)
                return
            except Exception as exc:  # see get_many
                self.remote_failed("SET", exc)
        if not self.local_first:
            self.local.set_many(items, ttl_s)

    async def execute_remote(self, commands: Sequence[RedisCommand], operation: str
                             ) -> list[Any] | None:
        """Run Redis commands in one round trip, for data that lives in Redis alone
        (counters, sets, HyperLogLogs: nothing the in-process layer could stand in for).

        Their replies (see ``RemoteStore.execute``), or ``None`` when there is no Redis,
        while it is being given ``retry_after_s`` after a failure, or when the commands
        fail: a failure counted, reported and logged as ``operation``, like any other.
        """
        if not self.remote_available:
            return None
        assert self.remote is not None
        try:
            return await self.remote.execute(commands)
        except Exception as exc:  # see get_many
            self.remote_failed(operation, exc)
            return None

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


class CacheCosts:
    """Per model, what a cache lookup and a computation cost (exponential moving averages
    of milliseconds per request), and whether the cache pays for that model now."""

    ALPHA = 0.1

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.lookup_ms: dict[str, float] = {}
        self.compute_ms: dict[str, float] = {}
        self._last_probe: dict[str, float] = {}

    def _update(self, table: dict[str, float], model: str, ms: float) -> None:
        old = table.get(model)
        table[model] = ms if old is None else old + self.ALPHA * (ms - old)

    def lookup(self, model: str, ms: float) -> None:
        self._update(self.lookup_ms, model, ms)

    def compute(self, model: str, ms: float) -> None:
        self._update(self.compute_ms, model, ms)

    def use_cache(self, model: str, policy: CachePolicy, probe_interval_s: float) -> bool:
        """``always``/``never`` as said; ``auto``: while either cost is unknown, while a
        lookup is cheaper than the computation, and once per ``probe_interval_s``."""
        if policy != "auto":
            return policy == "always"
        lookup, compute = self.lookup_ms.get(model), self.compute_ms.get(model)
        if lookup is None or compute is None or lookup < compute:
            return True
        now = self._clock()
        if now - self._last_probe.get(model, float("-inf")) >= probe_interval_s:
            self._last_probe[model] = now
            return True
        return False

    def snapshot(self, model: str, policy: CachePolicy, probe_interval_s: float
                 ) -> dict[str, Any]:
        lookup, compute = self.lookup_ms.get(model), self.compute_ms.get(model)
        pays = None if lookup is None or compute is None else lookup < compute
        return {"policy": policy, "lookup_ms": _rounded(lookup), "compute_ms": _rounded(compute),
                "in_use": policy == "always" or (policy == "auto" and pays is not False)}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


#: What a concurrent identical miss waits for: the leader's computed block and its row.
_Shared = tuple[dict[str, np.ndarray], int]


class PredictionCache:
    """Per-row answers: an in-process LRU in front of Redis (which other replicas share),
    single-flight misses, and write-backs after the answer."""

    def __init__(self, remote: RemoteStore | None, config: CacheConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 background: AfterAnswer | None = None) -> None:
        self.config = config or CacheConfig()
        self.store = ByteCache(remote, local_max_entries=self.config.local_max_entries,
                               retry_after_s=self.config.retry_after_s,
                               log_interval_s=self.config.log_interval_s,
                               name="prediction cache", clock=clock,
                               on_failure=self._remote_failed, local_first=True)
        self.counters = CacheCounters()
        self.costs = CacheCosts(clock)
        #: Where write-backs run once the rows are answered (bounded; dropped and counted).
        self.background = background or AfterAnswer()
        self._inflight: dict[str, asyncio.Future[_Shared]] = {}
        self.observer: CacheObserver | None = None
        self._evictions_told = 0

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

    def use_for(self, model: str) -> bool:
        """Whether this request's rows for ``model`` should go through the cache."""
        config = self.config
        return config.enabled and self.costs.use_cache(model, config.policy_of(model),
                                                       config.probe_interval_s)

    def keys(self, model: str, version: str, inputs: dict[str, np.ndarray]) -> list[str]:
        return row_keys(model, version, inputs, hash_name=self.config.hash,
                        prefix=self.config.key_prefix)

    async def settled(self, timeout_s: float = 5.0) -> None:
        """Wait for the write-backs started so far (tests, shutdown)."""
        await self.background.drain(timeout_s)

    async def fetch(self, model: str, keys: list[str], compute: Compute, version: str = ""
                    ) -> tuple[dict[str, np.ndarray], list[CacheStatus]]:
        """Every row's outputs (arrays over all rows, in order), from the cache where
        possible; ``compute`` gets the rest, as one call.

        Rows another request is already computing are awaited, not recomputed. An
        exception from ``compute`` reaches every request waiting on it. Computed rows are
        written back after this returns (``background``), under the keys given.
        """
        n = len(keys)
        if not self.config.enabled:
            return await compute(list(range(n))), ["miss"] * n
        hits: dict[int, dict[str, np.ndarray]] = {}
        statuses: list[CacheStatus] = ["miss"] * n
        began = time.perf_counter()
        for i, raw in enumerate(await self.store.get_many(keys, self.config.ttl_s)):
            if raw is None:
                continue
            try:
                hits[i] = decode_row(raw)
                statuses[i] = "hit"
            except ValueError:
                self.counters.corrupt += 1  # a poisoned entry is a miss and gets overwritten
        lookup_ms = (time.perf_counter() - began) * 1000
        leaders: dict[str, list[int]] = {}
        waits: dict[str, tuple[asyncio.Future[_Shared], list[int]]] = {}
        for i, key in enumerate(keys):
            if i in hits:
                continue
            if key in leaders:
                leaders[key].append(i)
            elif key in waits:
                waits[key][1].append(i)
            elif key in self._inflight:
                waits[key] = (self._inflight[key], [i])
            else:
                leaders[key] = [i]
        blocks: list[tuple[dict[str, np.ndarray], list[list[int]]]] = []
        if leaders:
            blocks.append((await self._lead(model, leaders, compute), list(leaders.values())))
        shared: dict[int, _Shared] = {}
        abandoned: dict[str, list[int]] = {}
        for key, (future, rows) in waits.items():
            try:
                outcome = await asyncio.shield(future)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not future.cancelled() or (task is not None and task.cancelling()):
                    raise  # this request itself was cancelled
                abandoned[key] = rows
                continue
            for i in rows:
                shared[i] = outcome
                statuses[i] = "shared"
        if abandoned:
            # The request computing these rows was cancelled (its client left, or its time
            # ran out): compute them here rather than fail a second request with it.
            blocks.append((await self._lead(model, abandoned, compute), list(abandoned.values())))
        outputs = _assemble(n, hits, shared, blocks)
        hit_n, miss_n, shared_n = (statuses.count("hit"), statuses.count("miss"),
                                   statuses.count("shared"))
        self.counters.add(self.counters.hits, model, hit_n)
        self.counters.add(self.counters.misses, model, miss_n)
        self.counters.add(self.counters.shared, model, shared_n)
        if self.observer is not None:
            self.observer.rows(model, hit_n, miss_n, shared_n, lookup_ms, version)
        return outputs, statuses

    async def _lead(self, model: str, leaders: dict[str, list[int]], compute: Compute
                    ) -> dict[str, np.ndarray]:
        """Compute the first row of each key in ``leaders`` as one block, hand it to
        concurrent requests waiting on those keys, and write it back afterwards."""
        owned: dict[str, asyncio.Future[_Shared]] = {}
        loop = asyncio.get_running_loop()
        for key in leaders:
            if key not in self._inflight:
                owned[key] = self._inflight[key] = loop.create_future()
        try:
            block = await compute([rows[0] for rows in leaders.values()])
            if any(len(v) != len(leaders) for v in block.values()):
                raise RuntimeError("compute returned the wrong number of rows")
            for j, key in enumerate(leaders):
                if key in owned:
                    owned[key].set_result((block, j))
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
        # This replica sees the rows at once; Redis (the other replicas) after the answer.
        items = dict(zip(leaders, encode_rows(block), strict=True))
        self.store.local.set_many(items, self.config.ttl_s)
        self.background.spawn(self._write_back(model, items), "cache_write")
        return block

    async def _write_back(self, model: str, items: dict[str, bytes]) -> None:
        began = time.perf_counter()
        await self.store.set_remote(items, self.config.ttl_s)
        if self.observer is not None:
            local = self.store.local
            evicted, self._evictions_told = (local.evictions - self._evictions_told,
                                             local.evictions)
            self.observer.stored(model, (time.perf_counter() - began) * 1000, len(local),
                                 evicted)

    def _remote_failed(self, what: str) -> None:
        self.counters.errors += 1
        if self.observer is not None:
            self.observer.remote_failed(what)


def _assemble(n: int, hits: dict[int, dict[str, np.ndarray]], shared: dict[int, _Shared],
              blocks: list[tuple[dict[str, np.ndarray], list[list[int]]]]
              ) -> dict[str, np.ndarray]:
    """Arrays over all ``n`` rows from decoded hits, shared rows and computed blocks."""
    if blocks:
        sample = {k: v[0] for k, v in blocks[0][0].items()}
    elif shared:
        block, j = next(iter(shared.values()))
        sample = {k: v[j] for k, v in block.items()}
    else:
        sample = next(iter(hits.values()))
    out = {k: np.empty((n, *np.shape(v)), dtype=np.asarray(v).dtype) for k, v in sample.items()}
    for block, groups in blocks:
        firsts = [rows[0] for rows in groups]
        for name, array in out.items():
            array[firsts] = block[name]
        for j, rows in enumerate(groups):
            if len(rows) > 1:  # the same row more than once in one request
                for name, array in out.items():
                    array[rows[1:]] = block[name][j]
    for i, (block, j) in shared.items():
        for name, array in out.items():
            array[i] = block[name][j]
    for i, row in hits.items():
        for name, array in out.items():
            array[i] = row[name]
    return out
