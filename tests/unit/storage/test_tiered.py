"""The tiered byte store against a real Redis (127.0.0.1:6379; `.ci/run` starts one)."""

from __future__ import annotations

import uuid

from deployments.storage.remote import redis_store
from deployments.storage.tiered import ByteCache

REDIS_URL = "redis://127.0.0.1:6379/0"


async def test_redis_commands_run_in_one_round_trip_and_failures_are_counted() -> None:
    """``execute_remote``: data that lives in Redis alone (counters, sets, HyperLogLogs)
    in one pipeline; no Redis, or a failed one, is ``None`` and a counted failure, and a
    failed Redis is not asked again for ``retry_after_s``."""
    prefix = f"keel-test:{uuid.uuid4().hex[:8]}:"
    store = redis_store(REDIS_URL)
    failures: list[str] = []
    cache = ByteCache(store, on_failure=failures.append)
    counters, users, members = prefix + "h", prefix + "u", prefix + "s"
    replies = await cache.execute_remote([
        ("HINCRBY", counters, "n", 2), ("HINCRBYFLOAT", counters, "usd", 0.25),
        ("EXPIRE", counters, 60), ("SADD", members, "a"), ("PFADD", users, "x"),
        ("PFADD", users, "x"), ("PFCOUNT", users)], "TEST")
    assert replies == [2, 0.25, True, 1, 1, 0, 1]
    replies = await cache.execute_remote([("HGETALL", counters), ("SMEMBERS", members)],
                                         "TEST")
    assert replies == [{b"n": b"2", b"usd": b"0.25"}, {b"a"}]
    assert await cache.execute_remote([], "TEST") == [] and failures == []
    await store.client.aclose()
    assert await ByteCache(None).execute_remote([("PFCOUNT", users)], "TEST") is None
    dead = ByteCache(redis_store("redis://127.0.0.1:1/0"), on_failure=failures.append,
                     retry_after_s=60)
    assert await dead.execute_remote([("PFCOUNT", users)], "TEST") is None
    assert failures == ["TEST"] and dead.errors == 1 and not dead.remote_available
    # While Redis is given its retry interval, it is not asked (nothing more counted).
    assert await dead.execute_remote([("PFCOUNT", users)], "TEST") is None
    assert failures == ["TEST"]
