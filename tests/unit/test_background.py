"""The one after-the-answer queue: one capacity over every kind, a limit and a drop
counter per kind, batches per lane, failures counted and never raised."""

from __future__ import annotations

import asyncio

from deployments.background import AfterAnswer


async def test_one_capacity_bounds_every_kind_and_drops_are_counted_per_kind() -> None:
    queue = AfterAnswer(capacity=5)
    release = asyncio.Event()
    handled: list[list[int]] = []

    async def handle(items: list[int]) -> None:
        await release.wait()
        handled.append(items)

    async def write() -> None:
        await release.wait()

    shadow = queue.lane("shadow_copy", handle, batch_size=lambda: 2, limit=lambda: 3)
    assert all(queue.spawn(write(), "cache_write") for _ in range(2))
    # 2 tasks held: the lane takes 3 (its own limit), then the 4th is over that limit
    assert [shadow.offer(i) for i in range(4)] == [True, True, True, False]
    # 5 held in all: a third kind finds no room although its own limit is far
    records = queue.lane("payload_record", handle, batch_size=lambda: 8, limit=lambda: 100)
    assert not records.offer(99)
    assert not queue.spawn(write(), "cache_write")
    assert queue.counts()["dropped"] == {"shadow_copy": 1, "payload_record": 1,
                                         "cache_write": 1}
    assert queue.held == 5
    release.set()
    await shadow.settled()
    await queue.drain()
    assert handled == [[0, 1], [2]]  # batches of at most batch_size()
    assert queue.counts()["done"] == {"shadow_copy": 3, "cache_write": 2}
    assert queue.held == 0 and records.offer(7)
    await records.settled()
    assert handled[-1] == [7]


async def test_a_failing_handler_is_counted_and_the_lane_goes_on() -> None:
    queue = AfterAnswer()
    seen: list[int] = []

    async def handle(items: list[int]) -> None:
        if 0 in items:
            raise RuntimeError("sink down")
        seen.extend(items)

    lane = queue.lane("payload_record", handle, batch_size=lambda: 1, limit=lambda: 10)
    for i in range(3):
        assert lane.offer(i)
    await lane.settled()
    assert seen == [1, 2]
    assert queue.counts()["failed"] == {"payload_record": 1}
    assert queue.counts()["done"] == {"payload_record": 2}


async def test_a_limit_of_zero_turns_a_kind_off() -> None:
    queue = AfterAnswer()

    async def handle(items: list[int]) -> None:
        return None

    lane = queue.lane("shadow_copy", handle, batch_size=lambda: 1, limit=lambda: 0)
    assert not lane.offer(1)
    assert queue.counts()["dropped"] == {"shadow_copy": 1}
