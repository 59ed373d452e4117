"""The in-process layer: a bounded LRU with per-entry expiry."""

from __future__ import annotations

from deployments.storage.local import LocalStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_local_store_is_a_bounded_lru_with_expiry() -> None:
    clock = Clock()
    store = LocalStore(2, clock)
    store.set_many({"a": b"1", "b": b"2"}, ttl_s=10)
    assert store.get_many(["a"]) == [b"1"]  # a is now the most recent
    store.set_many({"c": b"3"}, ttl_s=10)
    assert store.get_many(["a", "b", "c"]) == [b"1", None, b"3"]
    assert store.evictions == 1
    clock.now += 11
    assert store.get_many(["a", "c"]) == [None, None]
    assert len(store) == 0 and store.evictions == 1  # expiry is not eviction
