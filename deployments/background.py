"""Work a client does not wait for (cache writes, ...), run after the answer, bounded.

No Ray here. ``AfterAnswer.spawn`` starts the work as its own task and returns at
once; at most ``limit`` such tasks run at a time per process, and work beyond that
is dropped and counted, never queued without bound. A failure is counted and logged
(at most once per ``log_interval_s``), never raised to a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class AfterAnswer:
    """A bounded set of fire-and-forget tasks, counted by kind."""

    def __init__(self, limit: int = 256, log_interval_s: float = 30.0) -> None:
        self.limit = limit
        self.log_interval_s = log_interval_s
        self._tasks: set[asyncio.Task[Any]] = set()
        self.done: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self._last_log = float("-inf")

    @property
    def running(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, Any], kind: str) -> bool:
        """Run ``work`` in the background; False (and counted) when over the limit."""
        if len(self._tasks) >= self.limit:
            work.close()
            self.dropped[kind] += 1
            return False
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._finished(t, kind))
        return True

    def _finished(self, task: asyncio.Task[Any], kind: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self.dropped[kind] += 1
            return
        exc = task.exception()
        if exc is None:
            self.done[kind] += 1
            return
        self.failed[kind] += 1
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_s:
            self._last_log = now
            log.warning("background %s failed (%s: %s); failures so far: %s", kind,
                        type(exc).__name__, exc, dict(self.failed))

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait (up to ``timeout_s``) for the work started so far: shutdown and tests."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def counts(self) -> dict[str, dict[str, int]]:
        return {"done": dict(self.done), "dropped": dict(self.dropped),
                "failed": dict(self.failed), "running": {"all": self.running}}
