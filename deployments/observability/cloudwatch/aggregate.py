"""The in-process aggregate the metrics feed (the hot path): counters, gauges, histograms."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

# --- the in-process aggregate (the hot path) ---------------------------------------------


class Histogram:
    """Counts and sums per bucket (``bounds`` upper bounds, then +Inf), min, max."""

    __slots__ = ("bounds", "counts", "max", "min", "sums")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sums = [0.0] * (len(bounds) + 1)
        self.min = math.inf
        self.max = -math.inf

    def observe(self, value: float, count: int = 1) -> None:
        i = bisect.bisect_left(self.bounds, value)
        self.counts[i] += count
        self.sums[i] += value * count
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def merge(self, other: Histogram) -> None:
        for i, count in enumerate(other.counts):
            self.counts[i] += count
            self.sums[i] += other.sums[i]
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def total(self) -> float:
        return sum(self.sums)

    def values_counts(self) -> tuple[list[float], list[float]]:
        """One value per non-empty bucket (the mean of what fell in it) and its count."""
        values: list[float] = []
        counts: list[float] = []
        for count, total in zip(self.counts, self.sums, strict=True):
            if count:
                values.append(total / count)
                counts.append(float(count))
        return values, counts


#: One series: the metric's name and its dimension values (in ``dimension_names`` order).
Key = tuple[str, tuple[str, ...]]


@dataclass
class Snapshot:
    """What one flush ships: per series, a counter's sum, a gauge's value or a histogram."""

    counters: dict[Key, float] = field(default_factory=dict)
    gauges: dict[Key, float] = field(default_factory=dict)
    histograms: dict[Key, Histogram] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.counters) + len(self.gauges) + len(self.histograms)


class Aggregate:
    """This process's metrics since the last ``drain()``; thread-safe, cheap to call.

    Gauges keep their last value across drains (a gauge is a state, as Prometheus sees
    it); counters and histograms start again from zero. ``ExportedMetric`` updates the
    dicts under ``lock`` itself (the same as these methods, without the calls).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[Key, float] = {}
        self.gauges: dict[Key, float] = {}
        self.histograms: dict[Key, Histogram] = {}

    def inc(self, key: Key, value: float) -> None:
        with self.lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def set(self, key: Key, value: float) -> None:
        with self.lock:
            self.gauges[key] = value

    def observe(self, key: Key, value: float, bounds: Sequence[float]) -> None:
        with self.lock:
            histogram = self.histograms.get(key)
            if histogram is None:
                histogram = self.histograms[key] = Histogram(bounds)
            histogram.observe(value)

    def drain(self) -> Snapshot:
        with self.lock:
            snapshot = Snapshot(self.counters, dict(self.gauges), self.histograms)
            self.counters, self.histograms = {}, {}
        return snapshot
