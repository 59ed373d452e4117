"""Zero-wait coalescing: concurrent calls to one backend become one call per batch.

No Ray here. ``Coalescer.submit`` queues an item and returns its own result. A
batch leaves as soon as the event loop gets to it (``call_soon``), carrying every
item submitted meanwhile, so a lone request never waits for company, and under
load everything that piled up while earlier batches were running goes together in
ONE backend call (one Ray handle call, one ONNX Runtime run, one feature lookup).

Each item keeps its own fate: ``run`` answers per item (a result or an exception),
an item whose caller was cancelled before its batch left is dropped from it, and a
batch whose every caller went away is cancelled. The batch is shielded from any
single caller's cancellation (its time budget, a client that left).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from deployments.errors import Overloaded

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - the item type
R = TypeVar("R")

#: Answers a batch: one result or one exception per item, in order.
BatchRun = Callable[[list[I]], Awaitable[Sequence[R | BaseException]]]


@dataclass
class BatchStats:
    """What the coalescer did so far (tests and ``/v1/cache``-style introspection)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    dropped_cancelled: int = 0

    @property
    def mean_batch(self) -> float | None:
        return self.items / self.batches if self.batches else None


class Coalescer(Generic[I, R]):
    """Merge concurrent ``submit`` calls into batches of at most ``max_batch_size``,
    with at most ``max_in_flight`` batches running at once (more queue up and leave
    together when one finishes)."""

    def __init__(self, run: BatchRun[I, R], *, max_batch_size: int = 64,
                 max_in_flight: int = 4, max_queued: int = 4096,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1 or max_in_flight < 1:
            raise ValueError("max_batch_size and max_in_flight must be at least 1")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_in_flight = max_in_flight
        #: Past this many waiting items a new one is refused at once (503, Retry-After):
        #: the queue in front of a slow backend never grows without bound.
        self.max_queued = max_queued
        self._on_batch = on_batch
        self._queue: deque[tuple[I, asyncio.Future[R], contextvars.Context]] = deque()
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def submit(self, item: I) -> R:
        """``item``'s own result (or its own exception) from the batch it joined."""
        if len(self._queue) >= self.max_queued:
            raise Overloaded(f"{len(self._queue)} requests are already waiting for this "
                             f"backend; retry shortly")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        # The batch runs in the context of its first caller (as @serve.batch does): its spans
        # are that request's children and link the others.
        self._queue.append((item, future, contextvars.copy_context()))
        self._schedule(loop)
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._in_flight < self.max_in_flight:
            self._scheduled = True
            loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        while self._queue and self._in_flight < self.max_in_flight:
            batch: list[tuple[I, asyncio.Future[R]]] = []
            context: contextvars.Context | None = None
            while self._queue and len(batch) < self.max_batch_size:
                item, future, item_context = self._queue.popleft()
                if future.done():  # its caller gave up while it queued
                    self.stats.dropped_cancelled += 1
                    continue
                batch.append((item, future))
                context = context or item_context
            if not batch:
                continue
            self._in_flight += 1
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            if self._on_batch is not None:
                try:
                    self._on_batch(len(batch))
                except Exception:  # an observer never fails a batch
                    log.exception("batch observer failed")
            task = asyncio.get_running_loop().create_task(self._answer(batch), context=context)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        futures = [future for _, future in batch]
        items = [item for item, _ in batch]

        async def run() -> Sequence[R | BaseException]:
            return await self._run(items)

        work = asyncio.get_running_loop().create_task(run())

        def abandon_if_nobody_waits(_: asyncio.Future[R]) -> None:
            if all(f.done() for f in futures) and not work.done():
                work.cancel()

        for future in futures:
            future.add_done_callback(abandon_if_nobody_waits)
        try:
            results = await work
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(results)} answers")
            for future, result in zip(futures, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        except asyncio.CancelledError:
            for future in futures:
                if not future.done():
                    future.cancel()
        except Exception as exc:  # the whole batch failed: every caller hears why
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._in_flight -= 1
            if self._queue:
                self._schedule(asyncio.get_running_loop())
