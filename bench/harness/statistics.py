"""The figures the scenarios compute: latency percentiles, medians over repeats, ratios
between servers, the batch sizes a model ran between two stats snapshots."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def percentiles(values: Sequence[float] | np.ndarray, points: Sequence[int] = (50, 95, 99),
                *, digits: int | None = None, suffix: str = "_ms") -> dict[str, float | None]:
    """``{"p50_ms": ..., "p95_ms": ..., "p99_ms": ...}`` of ``values`` (numpy's linear
    interpolation), rounded to ``digits`` if given; every value None when there are none."""
    keys = [f"p{p}{suffix}" for p in points]
    if len(values) == 0:
        return dict.fromkeys(keys)
    found = np.percentile(np.asarray(values, dtype=np.float64), list(points))
    return {k: float(v) if digits is None else round(float(v), digits)
            for k, v in zip(keys, found, strict=True)}


def latency_figures(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99, mean and max in ms of latencies given in seconds (None: no values)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    figures = percentiles(ms)
    figures["mean_ms"] = float(ms.mean()) if ms.size else None
    figures["max_ms"] = float(ms.max()) if ms.size else None
    return figures


def median_or_none(values: Iterable[Any]) -> float | None:
    """The median of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def ratio(row: dict[str, Any], reference: dict[str, Any]) -> dict[str, float | None]:
    """``row`` over ``reference`` for throughput and the latency percentiles."""
    return {m: (row[m] / reference[m] if row[m] is not None and reference[m] else None)
            for m in ("rps", "p50_ms", "p95_ms", "p99_ms")}


def median_rows(runs: list[dict[str, Any]], run_key: str, names: list[str],
                concurrencies: Sequence[int | str], metrics: list[str], *,
                point_key: str = "concurrency") -> dict[str, dict[str, dict[str, Any]]]:
    """Per name (a run's ``run_key``) and concurrency: the number of repeats, the errors
    summed, and the median of each metric over the repeats. ``point_key`` names the
    field of a point that ``concurrencies`` are values of (e.g. a point's name)."""
    medians: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        medians[name] = {}
        for concurrency in concurrencies:
            points = [p for r in runs if r[run_key] == name for p in r["points"]
                      if p[point_key] == concurrency]
            if not points:
                continue
            row: dict[str, Any] = {"n": len(points),
                                   "errors": sum(p["errors"] for p in points)}
            for metric in metrics:
                row[metric] = median_or_none(p.get(metric) for p in points)
            medians[name][str(concurrency)] = row
    return medians


def ratios_against(medians: dict[str, dict[str, dict[str, Any]]], name: str,
                   reference: str) -> dict[str, dict[str, float | None]]:
    """``ratio`` per concurrency that both ``name`` and ``reference`` measured."""
    return {concurrency: ratio(row, medians[reference][concurrency])
            for concurrency, row in medians.get(name, {}).items()
            if medians.get(reference, {}).get(concurrency)}


def batch_delta(before: dict[str, Any] | None, after: dict[str, Any] | None,
                model: str) -> dict[str, int] | None:
    """Batch sizes a deployment ran between two stats snapshots (Keel's ``stats``)."""
    if not before or not after or "error" in before or "error" in after:
        return None
    try:
        old = Counter({int(k): v for k, v in before["models"][model]["batch_sizes"].items()})
        new = Counter({int(k): v for k, v in after["models"][model]["batch_sizes"].items()})
    except KeyError:
        return None
    new.subtract(old)
    return {str(k): v for k, v in sorted(new.items()) if v}


def mean_batch(sizes: dict[str, int] | None) -> float | None:
    """The mean batch size of a ``batch_delta`` (None: no batch)."""
    if not sizes:
        return None
    calls = sum(sizes.values())
    return sum(int(k) * v for k, v in sizes.items()) / calls if calls else None
