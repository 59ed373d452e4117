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
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from deployments.background import AfterAnswer
from deployments.cache.keys import row_keys
from deployments.cache.policy import CacheConfig, CacheCosts
from deployments.cache.rows import decode_row, encode_rows
from deployments.contracts import CacheStatus
from deployments.storage.local import LocalStore
from deployments.storage.remote import RemoteStore
from deployments.storage.tiered import ByteCache

log = logging.getLogger(__name__)


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
