"""``ByteCache``: bytes by key over Redis and the in-process LRU, with failure counting."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from deployments.storage.local import LocalStore
from deployments.storage.remote import RedisCommand, RemoteStore

log = logging.getLogger(__name__)


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
