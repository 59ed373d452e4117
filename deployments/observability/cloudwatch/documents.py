"""What a flush writes: EMF documents and PutMetricData batches within CloudWatch's limits."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deployments.observability.catalog import MetricSpec
from deployments.observability.cloudwatch.aggregate import Histogram, Key, Snapshot
from deployments.observability.cloudwatch.config import (
    MAX_ABS,
    MAX_CALL_BYTES,
    MAX_DATA_PER_CALL,
    MAX_DIMENSION_VALUE_CHARS,
    MAX_VALUES_PER_DATUM,
    MAX_VALUES_PER_EMF,
    NO_VALUE,
)

# --- what a flush writes -----------------------------------------------------------------


@dataclass(frozen=True)
class SeriesInfo:
    """What the flusher needs to know about a metric name."""

    spec: MetricSpec
    unit: str
    dimensions: tuple[str, ...]
    rollup: tuple[str, ...] | None


def _clean(value: str) -> str:
    """A dimension value CloudWatch accepts: non-empty ASCII, at most 1024 characters."""
    if not value:
        return NO_VALUE
    if not value.isascii():
        value = value.encode("ascii", "backslashreplace").decode("ascii")
    return value[:MAX_DIMENSION_VALUE_CHARS]


def _finite(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= MAX_ABS


def _series(snapshot: Snapshot, infos: Mapping[str, SeriesInfo]
            ) -> Iterable[tuple[SeriesInfo, dict[str, str], float | Histogram]]:
    for store in (snapshot.counters, snapshot.gauges, snapshot.histograms):
        for (name, values), value in store.items():
            info = infos[name]
            dims = {n: _clean(v) for n, v in zip(info.dimensions, values, strict=True)}
            yield info, dims, value


def emf_histogram(histogram: Histogram) -> list[dict[str, Any]]:
    """A histogram as EMF histogram objects (one per 100 buckets; Keel's have ≤ 33)."""
    values, counts = histogram.values_counts()
    parts = []
    for start in range(0, len(values), MAX_VALUES_PER_EMF):
        part_counts = counts[start:start + MAX_VALUES_PER_EMF]
        part_values = values[start:start + MAX_VALUES_PER_EMF]
        parts.append({"Values": part_values, "Counts": part_counts,
                      "Max": max(part_values) if start else histogram.max,
                      "Min": min(part_values) if start else histogram.min,
                      "Count": int(sum(part_counts)),
                      "Sum": sum(v * c for v, c in zip(part_values, part_counts,
                                                      strict=True))})
    if len(parts) == 1:
        parts[0]["Max"], parts[0]["Min"] = histogram.max, histogram.min
        parts[0]["Sum"] = histogram.total
    return parts


def emf_documents(snapshot: Snapshot, infos: Mapping[str, SeriesInfo], namespace: str,
                  timestamp_ms: int) -> list[str]:
    """The snapshot as EMF documents (JSON text, one per line), built with AWS's
    ``aws-embedded-metrics``: one ``MetricsContext`` per set of dimension values (and per
    rollup or not), serialised by its ``LogSerializer`` (at most 100 metrics a document)."""
    from aws_embedded_metrics.logger.metric import Metric
    from aws_embedded_metrics.logger.metrics_context import MetricsContext
    from aws_embedded_metrics.serializers.log_serializer import LogSerializer

    groups: dict[tuple[tuple[tuple[str, str], ...], tuple[str, ...] | None],
                 list[tuple[SeriesInfo, float | Histogram]]] = {}
    for info, dims, value in _series(snapshot, infos):
        if isinstance(value, Histogram) or _finite(value):
            groups.setdefault((tuple(dims.items()), info.rollup), []).append((info, value))
    documents: list[str] = []
    for (dims_items, rollup), members in groups.items():
        dims = dict(dims_items)
        extra: list[tuple[SeriesInfo, Any]] = []
        contexts = [MetricsContext(namespace=namespace)]
        for info, value in members:
            if isinstance(value, Histogram):
                parts = emf_histogram(value)
                contexts[0].metrics[info.spec.name] = Metric(parts[0],  # type: ignore[arg-type]
                                                             info.unit)
                extra += [(info, part) for part in parts[1:]]
            else:
                contexts[0].put_metric(info.spec.name, float(value), info.unit)
        for info, part in extra:  # a histogram of over 100 buckets: its own documents
            context = MetricsContext(namespace=namespace)
            context.metrics[info.spec.name] = Metric(part, info.unit)
            contexts.append(context)
        for context in contexts:
            sets = [dims] if rollup is None else [dims, {k: dims[k] for k in rollup}]
            context.set_dimensions(sets)
            context.meta["Timestamp"] = timestamp_ms
            documents += LogSerializer.serialize(context)
    return documents


def metric_data(snapshot: Snapshot, infos: Mapping[str, SeriesInfo], timestamp: dt.datetime
                ) -> list[dict[str, Any]]:
    """The snapshot as PutMetricData ``MetricDatum`` dicts, rollups merged here."""
    rolled = Snapshot()
    stores: tuple[Mapping[Key, float | Histogram], ...] = (snapshot.counters,
                                                            snapshot.histograms)
    for store in stores:
        for (name, dim_values), value in store.items():
            info = infos[name]
            if info.rollup is None:
                continue
            picked = tuple(v for n, v in zip(info.dimensions, dim_values, strict=True)
                           if n in info.rollup)
            key = (name, picked)
            if isinstance(value, Histogram):
                into = rolled.histograms.get(key)
                if into is None:
                    into = rolled.histograms[key] = Histogram(value.bounds)
                into.merge(value)
            else:
                rolled.counters[key] = rolled.counters.get(key, 0.0) + value
    rollup_infos = {name: SeriesInfo(info.spec, info.unit, info.rollup, None)
                    for name, info in infos.items() if info.rollup is not None}
    data: list[dict[str, Any]] = []
    for source, source_infos in ((snapshot, infos), (rolled, rollup_infos)):
        for info, dims, value in _series(source, source_infos):
            base: dict[str, Any] = {
                "MetricName": info.spec.name, "Timestamp": timestamp, "Unit": info.unit,
                "Dimensions": [{"Name": k, "Value": v} for k, v in dims.items()]}
            if isinstance(value, Histogram):
                values, counts = value.values_counts()
                for start in range(0, len(values), MAX_VALUES_PER_DATUM):
                    data.append({**base, "Values": values[start:start + MAX_VALUES_PER_DATUM],
                                 "Counts": counts[start:start + MAX_VALUES_PER_DATUM]})
            elif _finite(value):
                data.append({**base, "Value": float(value)})
    return data


def datum_bytes(datum: Mapping[str, Any]) -> int:
    """An upper estimate of a datum's share of a PutMetricData body in the wordiest
    protocol (AWS query: ``MetricData.member.N.Dimensions.member.M.Name=...``)."""
    size = 120 + len(datum["MetricName"])
    for dim in datum.get("Dimensions", ()):
        size += 110 + len(dim["Name"]) + 3 * len(dim["Value"])  # url-encoding may triple
    size += 70 * (len(datum.get("Values", ())) + len(datum.get("Counts", ())))
    return size + 40


def batches(data: Sequence[dict[str, Any]], max_count: int = MAX_DATA_PER_CALL,
            max_bytes: int = MAX_CALL_BYTES) -> list[list[dict[str, Any]]]:
    """``data`` in PutMetricData calls: at most ``max_count`` data and ``max_bytes``
    (estimated) each, in order."""
    out: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for datum in data:
        cost = datum_bytes(datum)
        if current and (len(current) >= max_count or size + cost > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(datum)
        size += cost
    if current:
        out.append(current)
    return out
