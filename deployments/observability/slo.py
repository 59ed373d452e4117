"""SLOs for the whole application from mergeable histograms (no Ray here).

Each process records events into its own :class:`Recorder`: a latency histogram
with fixed bucket bounds plus good/total counts per *series* (``api``, ``model``,
``cache``, or any name given to :func:`track`). Every second or so the Ray shell
drains the recorder and pushes the delta, stamped with the second it belongs to,
to one ``SloMonitor`` replica, whose :class:`SloBook` adds the deltas of every
ingress replica into per-second slots. Bucket counts add exactly, so a window's
percentile over all replicas is what one histogram of every request would give:
exact at bucket bounds (every default threshold is one), linearly interpolated
inside a bucket, as Prometheus' ``histogram_quantile`` does.

An objective is "a share of good events of at least a goal":

* latency, e.g. p95 ≤ 80 ms: at least 95 % of events take ≤ 80 ms; the value shown
  is the window's p95;
* success, e.g. ≥ 99.9 %: events that did not fail (5xx) over all events;
* ratio, e.g. cache hit ratio ≥ 30 %: good rows (hits) over all rows.

The error budget is the share of bad events the goal allows (5 %, 0.1 %, 70 %);
``budget_remaining = 1 - bad_share / allowed_bad_share`` (negative: overspent).
"""

from __future__ import annotations

import bisect
import functools
import inspect
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.observability.catalog import LATENCY_BUCKETS_MS
from deployments.observability.events import ServingObserver

WindowName = Literal["1m", "5m", "15m", "30m", "1h", "6h"]
WINDOW_SECONDS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "30m": 1800, "1h": 3600,
                                  "6h": 21600}

DEFAULT_WINDOWS: tuple[WindowName, ...] = ("1m", "5m", "1h")
#: Series the ingress records by itself.
API, MODEL, CACHE = "api", "model", "cache"


class Objective(BaseModel):
    """One SLO. ``latency`` needs ``percentile`` and ``threshold_ms``; the others ``target``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    series: str = Field(min_length=1, max_length=64)
    kind: Literal["latency", "success", "ratio"]
    percentile: float | None = Field(default=None, gt=0, lt=100)
    threshold_ms: float | None = Field(default=None, gt=0)
    target: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _complete(self) -> Objective:
        if self.kind == "latency":
            if self.percentile is None or self.threshold_ms is None:
                raise ValueError(f"objective {self.name!r}: a latency objective needs "
                                 f"percentile and threshold_ms")
            if self.target is not None:
                raise ValueError(f"objective {self.name!r}: target is for success/ratio "
                                 f"objectives; a latency objective uses percentile")
        else:
            if self.target is None:
                raise ValueError(f"objective {self.name!r}: a {self.kind} objective needs "
                                 f"target (a ratio in (0, 1])")
            if self.percentile is not None or self.threshold_ms is not None:
                raise ValueError(f"objective {self.name!r}: percentile/threshold_ms are for "
                                 f"latency objectives")
        return self

    @property
    def goal(self) -> float:
        """The least share of good events that meets the objective."""
        if self.kind == "latency":
            assert self.percentile is not None
            return self.percentile / 100.0
        assert self.target is not None
        return self.target

    @property
    def target_value(self) -> float:
        """The target in the unit of the value (ms for latency, a ratio otherwise)."""
        if self.kind == "latency":
            assert self.threshold_ms is not None
            return self.threshold_ms
        return self.goal


DEFAULT_OBJECTIVES: tuple[Objective, ...] = (
    Objective(name="api_p50", series=API, kind="latency", percentile=50, threshold_ms=25),
    Objective(name="api_p95", series=API, kind="latency", percentile=95, threshold_ms=80),
    Objective(name="model_p95", series=MODEL, kind="latency", percentile=95, threshold_ms=50),
    Objective(name="success", series=API, kind="success", target=0.999),
    Objective(name="cache_hit_ratio", series=CACHE, kind="ratio", target=0.30),
)


class SloConfig(BaseModel):
    """The SLO monitor's live knobs (its ``user_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    windows: list[WindowName] = Field(default_factory=lambda: list(DEFAULT_WINDOWS),
                                      min_length=1)
    objectives: list[Objective] = Field(default_factory=lambda: list(DEFAULT_OBJECTIVES),
                                        min_length=1)
    #: How often the monitor re-evaluates and sets its gauges.
    evaluate_interval_s: float = Field(default=5.0, gt=0, le=300)

    @model_validator(mode="after")
    def _unique(self) -> SloConfig:
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: duplicate names in {names}")
        if len(set(self.windows)) != len(self.windows):
            raise ValueError(f"windows: duplicates in {self.windows}")
        return self

    @property
    def longest_s(self) -> int:
        return max(WINDOW_SECONDS[w] for w in self.windows)


# --- recording (every process) ----------------------------------------------------------


@dataclass
class SeriesDelta:
    """Events of one series: latency bucket counts (if timed), good and total counts."""

    total: int = 0
    good: int = 0
    #: len(LATENCY_BUCKETS_MS) + 1 counts (the last is +Inf); empty when not timed.
    buckets: list[int] = field(default_factory=list)
    sum_ms: float = 0.0

    def add(self, other: SeriesDelta) -> None:
        self.total += other.total
        self.good += other.good
        self.sum_ms += other.sum_ms
        if other.buckets:
            if not self.buckets:
                self.buckets = [0] * len(other.buckets)
            for i, count in enumerate(other.buckets):
                self.buckets[i] += count


#: A push from one process: {second (unix, floor): {series: delta}}.
Delta = dict[int, dict[str, SeriesDelta]]


class Recorder:
    """This process's events since the last ``drain()``; thread-safe, cheap to call."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: Delta = {}

    def observe(self, series: str, latency_ms: float | None = None, *, good: bool = True,
                count: int = 1, good_count: int | None = None) -> None:
        """Record ``count`` events (``good_count`` of them good, default all or none)."""
        if count <= 0:
            return
        goods = good_count if good_count is not None else (count if good else 0)
        second = int(self._clock())
        with self._lock:
            delta = self._pending.setdefault(second, {}).setdefault(series, SeriesDelta())
            delta.total += count
            delta.good += goods
            if latency_ms is not None:
                if not delta.buckets:
                    delta.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
                delta.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += count
                delta.sum_ms += latency_ms * count

    def drain(self) -> Delta:
        """Everything recorded since the last drain (and forget it here)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def restore(self, delta: Delta, max_age_s: int = WINDOW_SECONDS["6h"]) -> None:
        """Put back a drained delta that could not be delivered (it is sent next time);
        seconds older than any window (``max_age_s``) are dropped, so an unreachable
        monitor cannot make this grow without bound."""
        oldest = int(self._clock()) - max_age_s
        with self._lock:
            for second, series in delta.items():
                if second < oldest:
                    continue
                slot = self._pending.setdefault(second, {})
                for name, part in series.items():
                    slot.setdefault(name, SeriesDelta()).add(part)


_process_recorder = Recorder()


def process_recorder() -> Recorder:
    """The recorder of this process (what the ingress pushes to the SLO monitor)."""
    return _process_recorder


F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def _timed(series: str, recorder: Recorder | None) -> Iterator[None]:
    target = recorder or _process_recorder
    started = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        target.observe(series, (time.perf_counter() - started) * 1000, good=ok)


class track:
    """Report a block's latency and success into an SLO series.

    ``with track("pricing"): ...`` or ``@track("pricing")`` on a function or coroutine
    function; an exception counts as a failure (and propagates). Add an objective
    with ``series: pricing`` to the SLO monitor's config to judge it.
    """

    def __init__(self, series: str, recorder: Recorder | None = None) -> None:
        self.series = series
        self.recorder = recorder
        self._cm: Any = None

    def __enter__(self) -> None:
        self._cm = _timed(self.series, self.recorder)
        self._cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)

    def __call__(self, fn: F) -> F:
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with _timed(self.series, self.recorder):
                    return await fn(*args, **kwargs)
            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with _timed(self.series, self.recorder):
                return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]


# --- aggregation and evaluation (the monitor) ------------------------------------------


class WindowResult(BaseModel):
    """One objective over one window."""

    value: float | None
    good_ratio: float | None
    compliant: bool | None
    budget_remaining: float | None
    events: int


class ObjectiveReport(BaseModel):
    name: str
    series: str
    kind: str
    target: float
    goal: float
    windows: dict[str, WindowResult]


class SloReport(BaseModel):
    """``GET /v1/slo``: every objective over every window, for the whole application."""

    evaluated_at: float
    sources: int
    objectives: list[ObjectiveReport]


class SloBook:
    """Per-second slots of merged deltas, kept as long as the longest window."""

    def __init__(self, config: SloConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or SloConfig()
        self._clock = clock
        self._slots: dict[int, dict[str, SeriesDelta]] = {}
        self._sources: dict[str, float] = {}

    def add(self, delta: Delta, source: str = "") -> None:
        """Merge one process's push."""
        self._sources[source] = self._clock()
        for second, series in delta.items():
            slot = self._slots.setdefault(int(second), {})
            for name, part in series.items():
                slot.setdefault(name, SeriesDelta()).add(part)
        self._prune()

    def _prune(self) -> None:
        oldest = int(self._clock()) - self.config.longest_s - 1
        for second in [s for s in self._slots if s < oldest]:
            del self._slots[second]

    def merged(self, series: str, window_s: int, now: float | None = None) -> SeriesDelta:
        """Everything recorded for ``series`` in the last ``window_s`` seconds."""
        now = self._clock() if now is None else now
        start = int(now) - window_s
        total = SeriesDelta()
        for second, slot in self._slots.items():
            if second > start and series in slot:
                total.add(slot[series])
        return total

    def report(self, now: float | None = None) -> SloReport:
        now = self._clock() if now is None else now
        self._prune()
        active = sum(1 for seen in self._sources.values() if now - seen < 60)
        objectives = []
        for objective in self.config.objectives:
            windows = {w: evaluate(objective, self.merged(objective.series, WINDOW_SECONDS[w],
                                                          now))
                       for w in self.config.windows}
            objectives.append(ObjectiveReport(name=objective.name, series=objective.series,
                                              kind=objective.kind,
                                              target=objective.target_value,
                                              goal=objective.goal, windows=windows))
        return SloReport(evaluated_at=now, sources=active, objectives=objectives)


def evaluate(objective: Objective, data: SeriesDelta) -> WindowResult:
    """One objective over the merged events of one window."""
    if data.total == 0:
        return WindowResult(value=None, good_ratio=None, compliant=None, budget_remaining=None,
                            events=0)
    goal = objective.goal
    if objective.kind == "latency":
        assert objective.threshold_ms is not None
        if not data.buckets:
            return WindowResult(value=None, good_ratio=None, compliant=None,
                                budget_remaining=None, events=data.total)
        value = quantile(data.buckets, goal)
        good_ratio = share_within(data.buckets, objective.threshold_ms)
        compliant = value <= objective.threshold_ms
    else:
        good_ratio = data.good / data.total
        value = good_ratio
        compliant = good_ratio >= goal
    allowed = 1.0 - goal
    bad = 1.0 - good_ratio
    budget = (1.0 if bad == 0 else -math.inf) if allowed <= 0 else 1.0 - bad / allowed
    return WindowResult(value=value, good_ratio=good_ratio, compliant=compliant,
                        budget_remaining=max(budget, -1e9), events=data.total)


def quantile(buckets: list[int], q: float,
             bounds: tuple[float, ...] = LATENCY_BUCKETS_MS) -> float:
    """The ``q`` quantile (0..1) of a bucketed distribution, interpolated linearly inside
    its bucket (the first bucket starts at 0; beyond the last bound: the last bound)."""
    total = sum(buckets)
    if total == 0:
        return math.nan
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return float(bounds[-1])


def share_within(buckets: list[int], threshold_ms: float,
                 bounds: tuple[float, ...] = LATENCY_BUCKETS_MS) -> float:
    """Share of events ≤ ``threshold_ms``: exact on a bucket bound, interpolated inside."""
    total = sum(buckets)
    if total == 0:
        return math.nan
    within = 0.0
    lower = 0.0
    for i, count in enumerate(buckets):
        upper = bounds[i] if i < len(bounds) else math.inf
        if threshold_ms >= upper:
            within += count
        else:
            if threshold_ms > lower and math.isfinite(upper):
                within += count * (threshold_ms - lower) / (upper - lower)
            break
        lower = upper
    return within / total


# --- what the ingress records ----------------------------------------------------------


def is_serving_route(http_route: str) -> bool:
    """Routes the API SLOs judge: inference and decisions (not health, metadata, docs)."""
    return http_route.endswith("/infer") or http_route == "/v1/decide"


class SloObserver(ServingObserver):
    """Feeds the ingress's requests and model calls into a :class:`Recorder`.

    ``api``: latency of every serving request, good unless it answered 5xx (a 4xx is
    the client's mistake, not a broken promise); ``model``: each model call's round
    trip from the ingress, good unless it raised; ``cache``: see :meth:`cache_rows`.
    """

    def __init__(self, recorder: Recorder | None = None) -> None:
        self.recorder = recorder or process_recorder()

    def request(self, http_route: str, model: str, status: int, latency_ms: float,
                version: str = "") -> None:
        if is_serving_route(http_route):
            self.recorder.observe(API, latency_ms, good=status < 500)

    def model_call(self, model: str, latency_ms: float, ok: bool) -> None:
        self.recorder.observe(MODEL, latency_ms, good=ok)

    def cache_rows(self, model: str, hits: int, misses: int, shared: int) -> None:
        """Rows answered without the model (hit, shared) are the cache SLO's good events."""
        self.recorder.observe(CACHE, count=hits + misses + shared, good_count=hits + shared)
