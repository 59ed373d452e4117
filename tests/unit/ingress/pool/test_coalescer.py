"""The zero-wait coalescer: one backend call per batch, each caller its own fate."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from deployments.errors import InvalidInput
from deployments.ingress.pool.coalescer import Coalescer


class Backend:
    """Squares numbers, one call per batch; a negative number is that item's own error."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[list[int]] = []
        self.delay_s = delay_s
        self.cancelled = 0

    async def run(self, items: list[int]) -> Sequence[int | BaseException]:
        self.calls.append(list(items))
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [InvalidInput(f"item {i} is negative") if i < 0 else i * i for i in items]


async def test_a_lone_call_leaves_at_once_without_waiting_for_company() -> None:
    backend = Backend()
    coalescer = Coalescer(backend.run)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await coalescer.submit(3) == 9
    assert loop.time() - started < 0.05  # no batch wait: one loop iteration
    assert backend.calls == [[3]]


async def test_concurrent_calls_become_one_backend_call_each_with_its_own_answer() -> None:
    backend = Backend()
    coalescer = Coalescer(backend.run, max_batch_size=64)
    answers = await asyncio.gather(*(coalescer.submit(i) for i in range(20)))
    assert answers == [i * i for i in range(20)]
    assert backend.calls == [list(range(20))]
    assert coalescer.stats.batches == 1 and coalescer.stats.mean_batch == 20


async def test_calls_arriving_while_batches_run_queue_into_the_next_one() -> None:
    backend = Backend(delay_s=0.05)
    coalescer = Coalescer(backend.run, max_batch_size=8, max_in_flight=1)
    first = asyncio.gather(*(coalescer.submit(i) for i in range(3)))
    await asyncio.sleep(0.01)  # the first batch is running
    later = asyncio.gather(*(coalescer.submit(i) for i in range(3, 13)))
    assert await first == [0, 1, 4]
    assert await later == [i * i for i in range(3, 13)]
    assert backend.calls == [[0, 1, 2], list(range(3, 11)), [11, 12]]  # at most 8 a batch


async def test_one_bad_item_fails_alone() -> None:
    backend = Backend()
    coalescer = Coalescer(backend.run)
    results = await asyncio.gather(coalescer.submit(2), coalescer.submit(-1),
                                   coalescer.submit(4), return_exceptions=True)
    assert results[0] == 4 and results[2] == 16
    assert isinstance(results[1], InvalidInput) and "item -1" in results[1].message
    assert len(backend.calls) == 1


async def test_a_caller_that_times_out_fails_alone_and_the_batch_finishes() -> None:
    backend = Backend(delay_s=0.1)
    coalescer = Coalescer(backend.run, max_in_flight=1)
    blocker = asyncio.create_task(coalescer.submit(0))
    await asyncio.sleep(0.01)  # 5 and 6 queue behind it and leave together
    patient = asyncio.create_task(coalescer.submit(5))
    hasty = asyncio.create_task(asyncio.wait_for(coalescer.submit(6), 0.15))
    with pytest.raises(TimeoutError):
        await hasty
    assert await patient == 25 and await blocker == 0
    assert backend.calls == [[0], [5, 6]] and backend.cancelled == 0


async def test_a_caller_cancelled_before_its_batch_leaves_is_dropped_from_it() -> None:
    backend = Backend(delay_s=0.05)
    coalescer = Coalescer(backend.run, max_in_flight=1)
    running = asyncio.create_task(coalescer.submit(1))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(coalescer.submit(2))
    kept = asyncio.create_task(coalescer.submit(3))
    await asyncio.sleep(0)
    queued.cancel()
    assert await running == 1 and await kept == 9
    assert backend.calls == [[1], [3]] and coalescer.stats.dropped_cancelled == 1


async def test_a_batch_whose_every_caller_left_is_cancelled() -> None:
    backend = Backend(delay_s=5)
    coalescer = Coalescer(backend.run)
    callers = [asyncio.create_task(coalescer.submit(i)) for i in range(3)]
    await asyncio.sleep(0.02)
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    await asyncio.sleep(0.02)
    assert backend.cancelled == 1
    assert coalescer.in_flight == 0
    assert await coalescer.submit(2) == 4  # and it keeps serving


async def test_a_backend_that_fails_as_a_whole_fails_every_caller_with_its_error() -> None:
    async def broken(items: list[int]) -> Sequence[int]:
        raise RuntimeError("backend down")

    coalescer: Coalescer[int, int] = Coalescer(broken)
    results = await asyncio.gather(coalescer.submit(1), coalescer.submit(2),
                                   return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "backend down" in str(r) for r in results)

    async def short(items: list[int]) -> Sequence[int]:
        return items[:-1]

    with pytest.raises(RuntimeError, match="a batch of 1 got 0 answers"):
        await Coalescer(short).submit(1)


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        Coalescer(Backend().run, max_batch_size=0)


async def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    from deployments.errors import Overloaded

    backend = Backend(delay_s=0.1)
    coalescer = Coalescer(backend.run, max_in_flight=1, max_queued=2)
    running = asyncio.create_task(coalescer.submit(1))
    await asyncio.sleep(0.01)
    queued = [asyncio.create_task(coalescer.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as refused:
        await coalescer.submit(4)
    assert refused.value.status == 503 and refused.value.retry_after_s == 1
    assert await running == 1 and [await q for q in queued] == [4, 9]
