"""Work done after the answers that caused it: a bounded queue and one worker. No Ray here.

The shadow mirror and the payload log put an item on an ``AsideQueue`` once a request's
answer is computed; one worker task (started on the first item) takes up to
``batch_size()`` items at a time and hands them to ``handle``, on the same event loop,
after the answering task has yielded. ``offer`` never waits: when the queue is at the
capacity the caller gives, the item is refused and the caller drops and counts it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class AsideQueue(Generic[T]):
    """Items waiting for ``handle``; ``handle`` must not raise (it counts its failures)."""

    def __init__(self, handle: Callable[[list[T]], Awaitable[None]],
                 batch_size: Callable[[], int]) -> None:
        self._handle = handle
        self._batch_size = batch_size
        self._items: deque[T] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: T, capacity: int) -> bool:
        """Queue ``item`` and wake the worker, unless ``capacity`` items are waiting
        already (False: refused)."""
        if len(self._items) >= capacity:
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
            await self._handle([self._items.popleft() for _ in range(count)])
