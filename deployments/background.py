"""Work a client does not wait for, run after the answer: one bounded queue per process.

No Ray here. Every kind of after-the-answer work goes through one ``AfterAnswer``:

- ``spawn(work, kind)``: a coroutine run as its own task (cache write-backs);
- ``lane(kind, handle, ...)``: items handed to ``handle`` in batches by one worker task
  (shadow copies, payload records), on the same event loop, after the answering task
  has yielded.

One ``capacity`` bounds everything waiting or running, and each kind may have a lower
limit of its own (the Ingress's ``shadow_queue``, ``payloads.queue``). Work beyond
either is refused at once, and dropped and counted per kind, never queued without
bound and never waited for. A failure is counted and logged (at most once per
``log_interval_s``), never raised to a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Everything one process may hold after its answers, all kinds together.
CAPACITY = 4096
#: Cache write-backs running at once (each one Redis pipeline).
SPAWN_LIMIT = 256


class AfterAnswer:
    """The bounded after-the-answer queue of one process, counted by kind."""

    def __init__(self, capacity: int = CAPACITY, log_interval_s: float = 30.0) -> None:
        self.capacity = capacity
        self.log_interval_s = log_interval_s
        self._tasks: dict[str, set[asyncio.Task[Any]]] = {}
        self._lanes: list[Lane[Any]] = []
        self.done: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self._last_log = float("-inf")

    @property
    def held(self) -> int:
        """Work waiting or running, all kinds together (at most ``capacity``)."""
        return (sum(len(tasks) for tasks in self._tasks.values())
                + sum(lane.held for lane in self._lanes))

    def admit(self, kind: str, held: int, limit: int) -> bool:
        """Whether one more item of ``kind`` (``held`` of them already) fits; a refusal
        is counted as dropped."""
        if held >= limit or self.held >= self.capacity:
            self.dropped[kind] += 1
            return False
        return True

    def spawn(self, work: Coroutine[Any, Any, Any], kind: str,
              limit: int = SPAWN_LIMIT) -> bool:
        """Run ``work`` as its own task; False (closed, counted) when there is no room."""
        tasks = self._tasks.setdefault(kind, set())
        if not self.admit(kind, len(tasks), limit):
            work.close()
            return False
        task = asyncio.get_running_loop().create_task(work)
        tasks.add(task)
        task.add_done_callback(lambda t: self._finished(t, kind))
        return True

    def lane(self, kind: str, handle: Callable[[list[T]], Awaitable[None]],
             batch_size: Callable[[], int], limit: Callable[[], int]) -> Lane[T]:
        """A lane of ``kind``: its items go to ``handle`` in batches of at most
        ``batch_size()``, at most ``limit()`` of them waiting."""
        lane: Lane[T] = Lane(self, kind, handle, batch_size, limit)
        self._lanes.append(lane)
        return lane

    def _finished(self, task: asyncio.Task[Any], kind: str) -> None:
        self._tasks[kind].discard(task)
        if task.cancelled():
            self.dropped[kind] += 1
            return
        exc = task.exception()
        if exc is None:
            self.done[kind] += 1
            return
        self.failed_once(kind, exc)

    def failed_once(self, kind: str, exc: BaseException) -> None:
        self.failed[kind] += 1
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_s:
            self._last_log = now
            log.warning("background %s failed (%s: %s); failures so far: %s", kind,
                        type(exc).__name__, exc, dict(self.failed))

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait (up to ``timeout_s``) for the tasks started so far: shutdown and tests."""
        tasks = [task for kind in self._tasks.values() for task in kind]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    def counts(self) -> dict[str, dict[str, int]]:
        waiting: Counter[str] = Counter()
        for lane in self._lanes:
            waiting[lane.kind] += lane.held
        return {"done": dict(self.done), "dropped": dict(self.dropped),
                "failed": dict(self.failed),
                "running": {"all": sum(len(t) for t in self._tasks.values())},
                "waiting": dict(waiting)}


class Lane(Generic[T]):
    """One kind's items in the after-the-answer queue, and the worker that handles them.

    ``handle`` must not raise (it counts its own failures; one that escapes is counted
    as the kind's failure and the worker goes on).
    """

    def __init__(self, queue: AfterAnswer, kind: str,
                 handle: Callable[[list[T]], Awaitable[None]],
                 batch_size: Callable[[], int], limit: Callable[[], int]) -> None:
        self._queue = queue
        self.kind = kind
        self._handle = handle
        self._batch_size = batch_size
        self._limit = limit
        self._items: deque[T] = deque()
        self._in_hand = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def held(self) -> int:
        """Items waiting plus the batch being handled."""
        return len(self._items) + self._in_hand

    def offer(self, item: T) -> bool:
        """Queue ``item`` and wake the worker; False (dropped, counted) when the lane's
        limit or the queue's capacity is reached. Never waits."""
        if not self._queue.admit(self.kind, len(self._items), self._limit()):
            return False
        self._items.append(item)
        self._idle.clear()
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())
        return True

    async def settled(self, timeout_s: float = 30.0) -> None:
        """Wait until every item queued so far was handled (tests, shutdown)."""
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def _run(self) -> None:
        while True:
            if not self._items:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            count = min(len(self._items), max(1, self._batch_size()))
            taken = [self._items.popleft() for _ in range(count)]
            self._in_hand = count
            try:
                await self._handle(taken)
                self._queue.done[self.kind] += count
            except Exception as exc:
                self._queue.failed_once(self.kind, exc)
            finally:
                self._in_hand = 0
