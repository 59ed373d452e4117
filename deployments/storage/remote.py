"""Redis: the remote store interface, its redis-py implementation (one round trip per
lookup, write-back or batch of commands) and the client the environment names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deployments.settings import RedisSettings

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
