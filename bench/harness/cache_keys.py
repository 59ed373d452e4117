"""A benchmark's own keys in the machine's Redis: each server or scenario writes its
cache keys under a prefix of its own, and only that prefix is ever emptied (SCAN +
UNLINK; never FLUSHDB), so Keel's other users of the same Redis keep theirs."""

from __future__ import annotations

from typing import Any


def redis_client(url: str | None = None) -> Any:
    """A client for ``url``, or for Keel's own Redis settings (``KEEL_REDIS_*``)."""
    import redis

    if url is not None:
        return redis.Redis.from_url(url, socket_timeout=5)
    from deployments.settings import RedisSettings

    settings = RedisSettings()
    password = settings.password.get_secret_value() if settings.password else None
    return redis.Redis.from_url(settings.url, password=password, socket_timeout=5)


def delete_prefix(client: Any, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN + UNLINK): only this server's keys."""
    if not prefix or any(c in prefix for c in "*?[]\\"):
        raise ValueError(f"refusing to delete keys under the prefix {prefix!r}")
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=prefix + "*", count=2000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted


def empty_prefix(prefix: str, client: Any = None) -> int | str:
    """``delete_prefix`` on Keel's Redis (or ``client``): the count, or why it could not
    (Redis down: Keel falls back to its in-process cache, and so does the benchmark)."""
    try:
        return delete_prefix(client if client is not None else redis_client(), prefix)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
