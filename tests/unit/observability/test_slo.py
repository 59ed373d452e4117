"""The SLO core: mergeable histograms, windows, objectives, config validation, ``track``."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.errors import ConfigError, parse_user_config
from deployments.observability.catalog import LATENCY_BUCKETS_MS
from deployments.observability.slo import (
    API,
    CACHE,
    MODEL,
    Objective,
    Recorder,
    SeriesDelta,
    SloBook,
    SloConfig,
    evaluate,
    quantile,
    share_within,
    track,
)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _buckets(values: list[float]) -> list[int]:
    recorder = Recorder(clock=Clock())
    for v in values:
        recorder.observe(API, v)
    [slot] = recorder.drain().values()
    return slot[API].buckets


def test_quantile_is_exact_on_bounds_and_interpolates_inside() -> None:
    assert quantile(_buckets([25.0] * 10), 0.5) == pytest.approx(22.5)  # all in (20, 25]
    # 10 events in (0,1], 10 in (20,25]: the median sits at the top of the first bucket.
    assert quantile(_buckets([0.5] * 10 + [22.0] * 10), 0.5) == pytest.approx(1.0)
    assert quantile(_buckets([99_999.0]), 0.99) == LATENCY_BUCKETS_MS[-1]
    assert math.isnan(quantile([0] * (len(LATENCY_BUCKETS_MS) + 1), 0.5))
    values = [5.0] * 95 + [100.0] * 5
    assert share_within(_buckets(values), 80) == pytest.approx(0.95)
    assert share_within(_buckets(values), 100) == pytest.approx(1.0)


def test_merged_replicas_equal_one_histogram_of_every_request() -> None:
    """Two ingress replicas pushing separately give exactly the single-process figures."""
    clock = Clock()
    latencies = np.random.default_rng(1).lognormal(mean=3.0, sigma=0.6, size=2000)
    one, left, right = Recorder(clock), Recorder(clock), Recorder(clock)
    for i, v in enumerate(latencies):
        one.observe(API, float(v), good=i % 100 != 0)
        (left if i % 3 else right).observe(API, float(v), good=i % 100 != 0)
    alone, merged = SloBook(clock=clock), SloBook(clock=clock)
    alone.add(one.drain(), "a")
    merged.add(left.drain(), "left")
    merged.add(right.drain(), "right")
    assert alone.report() .model_dump() | {"sources": 0} == merged.report().model_dump() | {
        "sources": 0}
    report = merged.report()
    assert report.sources == 2
    p95 = next(o for o in report.objectives if o.name == "api_p95").windows["1m"]
    assert p95.events == 2000
    # Within one bucket of the exact percentile of the raw values.
    exact = float(np.percentile(latencies, 95))
    upper = next(b for b in LATENCY_BUCKETS_MS if b >= exact)
    lower = max([0.0, *[b for b in LATENCY_BUCKETS_MS if b < exact]])
    assert p95.value is not None and lower <= p95.value <= upper
    success = next(o for o in report.objectives if o.name == "success").windows["1m"]
    assert success.value == pytest.approx(0.99) and success.compliant is False
    assert success.budget_remaining == pytest.approx(1 - 0.01 / 0.001)


def test_windows_forget_old_slots() -> None:
    clock = Clock()
    recorder = Recorder(clock)
    book = SloBook(SloConfig(windows=["1m", "5m"]), clock=clock)
    recorder.observe(MODEL, 200.0)
    book.add(recorder.drain())
    clock.now += 120
    recorder.observe(MODEL, 10.0)
    book.add(recorder.drain())
    model = next(o for o in book.report().objectives if o.name == "model_p95")
    assert model.windows["1m"].events == 1 and model.windows["1m"].compliant is True
    assert model.windows["5m"].events == 2 and model.windows["5m"].compliant is False
    clock.now += 400
    book.add({})
    assert book.merged(MODEL, 300).total == 0


def test_ratio_and_empty_windows() -> None:
    hits = Objective(name="hits", series=CACHE, kind="ratio", target=0.3)
    result = evaluate(hits, SeriesDelta(total=10, good=4))
    assert result.value == pytest.approx(0.4) and result.compliant is True
    assert result.budget_remaining == pytest.approx(1 - 0.6 / 0.7)
    empty = evaluate(hits, SeriesDelta())
    assert empty.value is None and empty.compliant is None and empty.events == 0
    perfect = Objective(name="all", series=API, kind="success", target=1.0)
    assert evaluate(perfect, SeriesDelta(total=5, good=5)).budget_remaining == 1.0
    assert evaluate(perfect, SeriesDelta(total=5, good=4)).budget_remaining == -1e9


def test_cache_rows_count_hits_as_good() -> None:
    clock = Clock()
    recorder = Recorder(clock)
    recorder.observe(CACHE, count=10, good_count=3)
    book = SloBook(clock=clock)
    book.add(recorder.drain())
    ratio = next(o for o in book.report().objectives if o.name == "cache_hit_ratio")
    assert ratio.windows["5m"].value == pytest.approx(0.3) and ratio.windows["5m"].compliant


def test_undelivered_deltas_are_restored() -> None:
    clock = Clock()
    recorder = Recorder(clock)
    recorder.observe(API, 3.0)
    first = recorder.drain()
    recorder.observe(API, 4.0)
    recorder.restore(first)
    [slot] = recorder.drain().values()
    assert slot[API].total == 2 and sum(slot[API].buckets) == 2
    assert recorder.drain() == {}
    recorder.observe(API, 5.0)
    stale = recorder.drain()
    clock.now += 7 * 3600  # the monitor was away longer than the longest window
    recorder.restore(stale)
    assert recorder.drain() == {}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"objectives": [{"name": "x", "series": "api", "kind": "latency", "percentile": 95,
                          "threshold_ms": -5}]}, "objectives.0.threshold_ms"),
        ({"objectives": [{"name": "x", "series": "api", "kind": "latency", "percentile": 150,
                          "threshold_ms": 5}]}, "objectives.0.percentile"),
        ({"windows": ["1m", "2m"]}, "windows.1"),
        ({"objectives": [{"name": "x", "series": "api", "kind": "success", "target": 1.5}]},
         "objectives.0.target"),
        ({"objectives": [{"name": "x", "series": "api", "kind": "latency",
                          "percentile": 95}]}, "needs percentile and threshold_ms"),
        ({"objectives": [{"name": "x", "series": "api", "kind": "ratio"}]}, "needs target"),
        ({"objectives": [{"name": "x", "series": "api", "kind": "ratio", "target": 0.5},
                         {"name": "x", "series": "api", "kind": "ratio", "target": 0.6}]},
         "duplicate names"),
        ({"window": ["1m"]}, "window"),
    ],
)
def test_a_malformed_slo_config_is_refused_naming_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_user_config(SloConfig, raw, "SloMonitor")
    assert "SloMonitor" in info.value.message and field in info.value.message
    with pytest.raises(ValidationError):
        SloConfig.model_validate(raw)


def test_track_as_context_manager_and_decorators() -> None:
    recorder = Recorder(Clock())
    with track("block", recorder):
        pass
    with pytest.raises(RuntimeError), track("block", recorder):
        raise RuntimeError("boom")

    @track("sync", recorder)
    def add(a: int, b: int) -> int:
        return a + b

    @track("async", recorder)
    async def double(a: int) -> int:
        await asyncio.sleep(0)
        return 2 * a

    assert add(1, 2) == 3
    assert asyncio.run(double(4)) == 8
    [slot] = recorder.drain().values()
    assert (slot["block"].total, slot["block"].good) == (2, 1)
    assert (slot["sync"].total, slot["async"].total) == (1, 1)
    assert sum(slot["async"].buckets) == 1
