"""The in-process layer: a bounded LRU with per-entry expiry."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence


class LocalStore:
    """A bounded in-process LRU with per-entry expiry: the fallback when Redis is away."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        #: Entries pushed out to stay within ``max_entries`` (expired ones not counted).
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self._clock()
        out: list[bytes | None] = []
        for key in keys:
            item = self._data.get(key)
            if item is None or item[0] <= now:
                if item is not None:
                    del self._data[key]
                out.append(None)
                continue
            self._data.move_to_end(key)
            out.append(item[1])
        return out

    def set_many(self, items: dict[str, bytes], ttl_s: float) -> None:
        if self.max_entries <= 0:
            return
        expires = self._clock() + ttl_s
        for key, value in items.items():
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.evictions += 1
