"""Keel's metrics to Amazon CloudWatch as well, off by default (no Ray here).

``deployments.observability.ray_metrics.make`` wraps each ``ray.serve.metrics`` object
in an :class:`ExportedMetric` when ``KEEL_CLOUDWATCH_SINK`` is ``emf`` or
``put_metric_data``; with the sink ``off`` (the default) it returns the Ray object
untouched and nothing here runs.

* **Hot path**: ``inc``/``set``/``observe`` call the Ray metric as before, then add the
  value to this process's :class:`Aggregate` under one lock: counters summed, gauges
  last value, histograms as counts and sums per bucket of the catalog's bounds (plus
  min, max, count, sum). No I/O, no allocation beyond the first sight of a series, and
  an exception inside is counted, never raised.
* **Flusher**: one daemon thread per process swaps the aggregate out every
  ``KEEL_CLOUDWATCH_FLUSH_INTERVAL_S`` and ships it: EMF documents built with AWS's
  ``aws-embedded-metrics`` library (``MetricsContext`` + its ``LogSerializer``, which
  splits at 100 metrics per document) appended to a file or written to stdout, or
  ``PutMetricData`` calls through boto3 in batches of at most 1000 metric data and
  about 1 MB. A failing sink (an unwritable file, an endpoint that does not answer) is
  counted per operation (:data:`catalog.CLOUDWATCH_ERRORS`) and logged at most once an interval;
  that interval's data is dropped.
* **Histograms**: CloudWatch stores values with counts and computes percentiles from
  them. Each non-empty bucket is sent as one value, the mean of what fell in it, with
  its count: the sum and count are exact, a percentile is placed within the bucket
  (exact against every SLO threshold, which are all bucket bounds). PutMetricData gets
  ``Values``/``Counts``; EMF gets the ``{"Values", "Counts", "Max", "Min", "Count",
  "Sum"}`` object that AWS's own OpenTelemetry EMF exporter writes (exact min/max).
* **Dimensions**: ``KEEL_CLOUDWATCH_DIMENSIONS`` picks them from the replica's
  ``application`` and ``deployment`` and the metric's own tags; counters and histograms
  are also written under ``KEEL_CLOUDWATCH_ROLLUP_DIMENSIONS`` (default: the application
  alone), so that a percentile over every route and model exists (CloudWatch cannot
  merge percentiles of separate series).
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import datetime as dt
import logging
import math
import operator
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from deployments.errors import ConfigError
from deployments.observability import catalog
from deployments.observability.catalog import MetricSpec
from deployments.settings import CloudWatchSettings

log = logging.getLogger(__name__)

ENV_PREFIX = "KEEL_CLOUDWATCH_"

# --- CloudWatch's limits (PutMetricData and EMF, as documented in 2025) ------------------

#: Dimensions on one metric.
MAX_DIMENSIONS = 30
#: Metric data in one PutMetricData call (raised from 20 to 1000 in 2023).
MAX_DATA_PER_CALL = 1000
#: One PutMetricData call's body is limited to 1 MB; what we estimate stays under this.
MAX_CALL_BYTES = 900_000
#: Distinct values in one MetricDatum's Values/Counts.
MAX_VALUES_PER_DATUM = 150
#: Values/Counts entries in one EMF histogram object (AWS's EMF exporter splits there).
MAX_VALUES_PER_EMF = 100
#: Metrics in one EMF document (the library splits there too).
MAX_METRICS_PER_EMF = 100
MAX_NAMESPACE_CHARS = 255
MAX_DIMENSION_VALUE_CHARS = 1024
#: CloudWatch rejects values beyond ±2^360 (and NaN, ±Inf).
_MAX_ABS = 2.0 ** 360

Sink = Literal["off", "emf", "put_metric_data"]
SINKS: tuple[str, ...] = ("off", "emf", "put_metric_data")
#: Dimension names taken from the replica rather than a metric's tags.
REPLICA_DIMENSIONS: tuple[str, ...] = ("application", "deployment")
#: Stands for an empty or missing dimension value (CloudWatch refuses empty ones).
NO_VALUE = "none"

#: CloudWatch's units (the same list as ``aws_embedded_metrics.unit.Unit``).
UNITS: tuple[str, ...] = (
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes",
    "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count",
    "Bytes/Second", "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second",
    "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second",
    "Gigabits/Second", "Terabits/Second", "Count/Second", "None",
)


def default_unit(name: str) -> str:
    """A metric's CloudWatch unit from its catalog name."""
    if name.endswith("_ms"):
        return "Milliseconds"
    if name.endswith("_seconds"):
        return "Seconds"
    if "usd" in name:
        return "None"
    if name.endswith(("_total", "_batch_size", "_events")):
        return "Count"
    return "None"


def tag_names() -> set[str]:
    """Every tag a catalog metric carries."""
    return {tag for spec in (*catalog.ALL, catalog.CLOUDWATCH_ERRORS) for tag in spec.tags}


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class CloudWatchConfig:
    """The export's validated settings (see ``CloudWatchSettings`` for each field)."""

    sink: Sink = "off"
    namespace: str = "Keel"
    dimensions: tuple[str, ...] = ("application", "tags")
    rollup_dimensions: tuple[str, ...] = ("application",)
    units: Mapping[str, str] = field(default_factory=dict)
    flush_interval_s: float = 60.0
    emf_file: str = ""
    region: str = ""
    endpoint_url: str = ""
    timeout_s: float = 5.0

    def dimension_names(self, spec: MetricSpec) -> tuple[str, ...]:
        """The dimensions ``spec`` is written with (replica ones first, then its tags)."""
        names = [d for d in REPLICA_DIMENSIONS if d in self.dimensions]
        names += [t for t in spec.tags if "tags" in self.dimensions or t in self.dimensions]
        return tuple(names)

    def rollup_names(self, spec: MetricSpec) -> tuple[str, ...] | None:
        """The coarser dimension set of a counter or histogram; ``None``: none (a gauge,
        no rollup configured, or one equal to the full set)."""
        if spec.kind == "gauge" or not self.rollup_dimensions:
            return None
        full = self.dimension_names(spec)
        every_tag = "tags" in self.rollup_dimensions
        names = tuple(d for d in full if d in self.rollup_dimensions
                      or (every_tag and d not in REPLICA_DIMENSIONS))
        return None if names == full else names

    def dimension_sets(self, spec: MetricSpec) -> list[tuple[str, ...]]:
        """Every dimension set ``spec`` is written with: what a dashboard may query."""
        rollup = self.rollup_names(spec)
        return [self.dimension_names(spec)] + ([rollup] if rollup is not None else [])

    def unit(self, spec: MetricSpec) -> str:
        return self.units.get(spec.name) or default_unit(spec.name)


def _names(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _variable(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def parse_settings(settings: CloudWatchSettings) -> CloudWatchConfig:
    """Check ``settings``; a ``ConfigError`` names the variable that is wrong."""

    def refuse(field_name: str, message: str) -> ConfigError:
        return ConfigError(f"{_variable(field_name)}: {message}")

    sink = settings.sink.strip().lower()
    if sink not in SINKS:
        raise refuse("sink", f"{settings.sink!r} is not one of {', '.join(SINKS)}")
    namespace = settings.namespace.strip()
    if not namespace:
        raise refuse("namespace", "empty; CloudWatch needs a namespace (default Keel)")
    if len(namespace) > MAX_NAMESPACE_CHARS or not re.fullmatch(r"[a-zA-Z0-9._#:/-]+",
                                                                  namespace):
        raise refuse("namespace", f"{namespace!r}: at most {MAX_NAMESPACE_CHARS} of "
                     f"a-z A-Z 0-9 . _ # : / -")
    if namespace.startswith("AWS/"):
        raise refuse("namespace", f"{namespace!r}: AWS/ is reserved for AWS services")
    known = set(REPLICA_DIMENSIONS) | {"tags"} | tag_names()
    dimensions = _names(settings.dimensions)
    rollup = _names(settings.rollup_dimensions)
    if len(dimensions) > MAX_DIMENSIONS:
        raise refuse("dimensions", f"{len(dimensions)} dimensions; CloudWatch allows at "
                     f"most {MAX_DIMENSIONS}")
    for field_name, names in (("dimensions", dimensions), ("rollup_dimensions", rollup)):
        unknown = sorted(set(names) - known)
        if unknown:
            raise refuse(field_name, f"unknown {unknown}; use application, deployment, tags "
                         f"or tag names ({', '.join(sorted(tag_names()))})")
        if len(names) != len(set(names)):
            raise refuse(field_name, f"duplicates in {list(names)}")
    allowed = set(dimensions) | (tag_names() if "tags" in dimensions else set())
    outside = sorted(set(rollup) - allowed)
    if outside:
        raise refuse("rollup_dimensions", f"{outside} not in KEEL_CLOUDWATCH_DIMENSIONS "
                     f"({', '.join(dimensions)}): a rollup is a subset of the dimensions")
    units: dict[str, str] = {}
    metrics = {spec.name for spec in catalog.ALL} | {catalog.CLOUDWATCH_ERRORS.name}
    for item in _names(settings.units):
        metric, sep, unit = (part.strip() for part in item.partition("="))
        if not sep or metric not in metrics:
            raise refuse("units", f"{item!r}: expected <catalog metric>=<unit>")
        if unit not in UNITS:
            raise refuse("units", f"{unit!r} is not a CloudWatch unit ({', '.join(UNITS)})")
        units[metric] = unit
    if not 0 < settings.flush_interval_s <= 3600:
        raise refuse("flush_interval_s", f"{settings.flush_interval_s}: must be in (0, 3600]")
    if not 0 < settings.timeout_s <= 60:
        raise refuse("timeout_s", f"{settings.timeout_s}: must be in (0, 60]")
    config = CloudWatchConfig(
        sink=sink,  # type: ignore[arg-type]  # checked against SINKS above
        namespace=namespace, dimensions=dimensions, rollup_dimensions=rollup, units=units,
        flush_interval_s=settings.flush_interval_s, emf_file=settings.emf_file.strip(),
        region=settings.region.strip(), endpoint_url=settings.endpoint_url.strip(),
        timeout_s=settings.timeout_s)
    for spec in (*catalog.ALL, catalog.CLOUDWATCH_ERRORS):
        if len(config.dimension_names(spec)) > MAX_DIMENSIONS:
            raise refuse("dimensions", f"{spec.name} would have "
                         f"{len(config.dimension_names(spec))} dimensions (at most "
                         f"{MAX_DIMENSIONS})")
    return config


def read_config() -> CloudWatchConfig:
    """The configuration from this process's environment; ``ConfigError`` naming the
    variable when a value is malformed."""
    try:
        settings = CloudWatchSettings()
    except ValidationError as exc:
        problems = "; ".join(f"{_variable(str(err['loc'][0]))}: {err['msg']}"
                             for err in exc.errors())
        raise ConfigError(problems) from exc
    return parse_settings(settings)


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
    return math.isfinite(value) and abs(value) <= _MAX_ABS


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


# --- sinks -------------------------------------------------------------------------------


class EmfSink:
    """EMF lines appended to a file (opened per flush, so rotation works) or stdout."""

    name = "emf"

    def __init__(self, path: str) -> None:
        self.path = path

    def ship(self, snapshot: Snapshot, infos: Mapping[str, SeriesInfo], namespace: str,
             now: float) -> int:
        documents = emf_documents(snapshot, infos, namespace, int(now * 1000))
        if not documents:
            return 0
        text = "".join(doc + "\n" for doc in documents)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        return len(documents)


class PutMetricDataSink:
    """``PutMetricData`` through boto3 (client made on first use, in the flusher)."""

    name = "put_metric_data"

    def __init__(self, config: CloudWatchConfig) -> None:
        self.config = config
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()
            self._client = session.client(
                "cloudwatch", region_name=self.config.region or None,
                endpoint_url=self.config.endpoint_url or None,
                config=Config(connect_timeout=self.config.timeout_s,
                              read_timeout=self.config.timeout_s,
                              retries={"max_attempts": 2, "mode": "standard"}))
        return self._client

    def ship(self, snapshot: Snapshot, infos: Mapping[str, SeriesInfo], namespace: str,
             now: float) -> int:
        """Every batch is tried; the number of failed calls is raised as one error."""
        data = metric_data(snapshot, infos, dt.datetime.fromtimestamp(now, dt.UTC))
        failed: list[BaseException] = []
        calls = batches(data)
        for batch in calls:
            try:
                self.client().put_metric_data(Namespace=namespace, MetricData=batch)
            except Exception as exc:
                failed.append(exc)
        if failed:
            raise SinkFailed(len(failed), len(calls), failed[-1])
        return len(calls)


class SinkFailed(Exception):
    """Some PutMetricData calls of a flush failed (``failed`` of ``calls``)."""

    def __init__(self, failed: int, calls: int, last: BaseException) -> None:
        super().__init__(f"{failed} of {calls} PutMetricData calls failed, last: {last!r}")
        self.failed = failed


def check_region(config: CloudWatchConfig) -> None:
    """PutMetricData needs a region: refuse to start without one."""
    if config.sink != "put_metric_data" or config.region:
        return
    import boto3

    if not boto3.session.Session().region_name:
        raise ConfigError(f"{_variable('region')}: no AWS region (set it, or AWS_REGION) "
                          f"for KEEL_CLOUDWATCH_SINK=put_metric_data")


# --- the exporter ------------------------------------------------------------------------


class ExportedMetric:
    """A Ray metric that also adds each value to the CloudWatch aggregate.

    The recording methods are the hot path: Ray's call as before, then the key (the
    dimension values, picked in C by ``itemgetter``) and one update under the aggregate's
    lock, inlined here.
    """

    __slots__ = ("_aggregate", "_bounds", "_exporter", "_metric", "_name", "_pick",
                 "_replica")

    def __init__(self, exporter: Exporter, info: SeriesInfo, metric: Any,
                 replica: Mapping[str, str | None]) -> None:
        self._metric = metric
        self._exporter = exporter
        self._aggregate = exporter.aggregate
        self._name = info.spec.name
        self._bounds = info.spec.buckets
        self._replica = tuple(replica.get(d) or NO_VALUE
                              for d in info.dimensions if d in REPLICA_DIMENSIONS)
        tags = tuple(d for d in info.dimensions if d not in REPLICA_DIMENSIONS)
        self._pick: Callable[[Mapping[str, str]], tuple[str, ...]] | None
        if not tags:
            self._pick = None
        elif len(tags) == 1:
            only = tags[0]
            self._pick = lambda values: (values[only],)
        else:
            self._pick = operator.itemgetter(*tags)

    def _key(self, tags: Mapping[str, str] | None) -> Key:
        pick = self._pick
        if pick is None:
            return self._name, self._replica
        assert tags is not None  # Ray has refused the call already otherwise
        return self._name, self._replica + pick(tags)

    def _checked_key(self, value: float, tags: Mapping[str, str] | None) -> Key:
        if not -_MAX_ABS <= value <= _MAX_ABS:  # NaN, ±Inf: CloudWatch refuses them
            raise ValueError(value)
        return self._key(tags)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._metric.inc(value, tags=tags)
        try:
            key = self._checked_key(value, tags)
            aggregate = self._aggregate
            with aggregate.lock:
                counters = aggregate.counters
                counters[key] = counters.get(key, 0.0) + value
        except Exception:
            self._exporter.record_failed()

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._metric.set(value, tags=tags)
        try:
            key = self._checked_key(value, tags)
            aggregate = self._aggregate
            with aggregate.lock:
                aggregate.gauges[key] = value
        except Exception:
            self._exporter.record_failed()

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._metric.observe(value, tags=tags)
        try:
            key = self._checked_key(value, tags)
            aggregate = self._aggregate
            with aggregate.lock:
                histogram = aggregate.histograms.get(key)
                if histogram is None:
                    histogram = aggregate.histograms[key] = Histogram(self._bounds)
                histogram.observe(value)
        except Exception:
            self._exporter.record_failed()

    def __getattr__(self, name: str) -> Any:  # set_default_tags, info... as Ray has them
        return getattr(self._metric, name)


class Exporter:
    """This process's aggregate, its sink and the daemon thread that flushes it."""

    def __init__(self, config: CloudWatchConfig, *, clock: Callable[[], float] = time.time
                 ) -> None:
        if config.sink == "off":
            raise ValueError("an exporter needs a sink")
        self.config = config
        self.aggregate = Aggregate()
        self.sink: EmfSink | PutMetricDataSink = (
            EmfSink(config.emf_file) if config.sink == "emf" else PutMetricDataSink(config))
        self.infos: dict[str, SeriesInfo] = {}
        #: Failures by operation (also sent to ``on_error``, e.g. a Ray counter).
        self.errors: Counter[str] = Counter()
        self.on_error: Callable[[str, int], None] | None = None
        #: Flushes that shipped something, and documents (EMF) or calls (PutMetricData).
        self.flushes = 0
        self.shipped = 0
        self._clock = clock
        self._logged: dict[str, float] = {}
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def info(self, spec: MetricSpec) -> SeriesInfo:
        info = self.infos.get(spec.name)
        if info is None:
            info = self.infos[spec.name] = SeriesInfo(
                spec, self.config.unit(spec), self.config.dimension_names(spec),
                self.config.rollup_names(spec))
        return info

    def wrap(self, spec: MetricSpec, metric: Any, *, application: str | None = None,
             deployment: str | None = None) -> ExportedMetric:
        """``metric`` (a Ray Counter/Gauge/Histogram for ``spec``), also exported."""
        return ExportedMetric(self, self.info(spec), metric,
                              {"application": application, "deployment": deployment})

    # -- failures

    def record_failed(self) -> None:
        self._failed("record", 1, None)

    def _failed(self, operation: str, count: int, exc: BaseException | None) -> None:
        self.errors[operation] += count
        if self.on_error is not None:
            with contextlib.suppress(Exception):
                self.on_error(operation, count)
        now = self._clock()
        if now - self._logged.get(operation, -math.inf) >= self.config.flush_interval_s:
            self._logged[operation] = now
            log.warning("CloudWatch export (%s) failed%s; the data is dropped (logged at "
                        "most once per %.0f s)", operation, f": {exc!r}" if exc else "",
                        self.config.flush_interval_s)

    # -- flushing

    def flush(self) -> int:
        """Ship what was recorded since the last flush; never raises. Returns what was
        shipped (EMF documents or PutMetricData calls)."""
        with self._flush_lock:
            try:
                snapshot = self.aggregate.drain()
                if not len(snapshot):
                    return 0
                shipped = self.sink.ship(snapshot, self.infos, self.config.namespace,
                                         self._clock())
            except SinkFailed as exc:
                self._failed(self.sink.name, exc.failed, exc)
                return 0
            except Exception as exc:  # an unwritable file, a missing boto3...
                self._failed(self.sink.name, 1, exc)
                return 0
            self.flushes += 1
            self.shipped += shipped
            return shipped

    def start(self) -> Exporter:
        """Start the daemon flusher (once) and a last flush at interpreter exit."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="keel-cloudwatch",
                                            daemon=True)
            self._thread.start()
            atexit.register(self.close)
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.config.flush_interval_s):
            self.flush()

    def close(self) -> None:
        """Stop the flusher and ship what is left."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.config.timeout_s * 2 + 1)
        self.flush()


# --- one exporter per process ------------------------------------------------------------

_process_lock = threading.Lock()
_process: Exporter | None = None
_process_off = False


def process_exporter() -> Exporter | None:
    """This process's exporter, started on first use; ``None`` when the sink is off (then
    nothing else here runs). A malformed setting raises ``ConfigError`` (the replica's
    start fails, naming the variable)."""
    global _process, _process_off
    if _process is not None:
        return _process
    if _process_off:
        return None
    with _process_lock:
        if _process is None and not _process_off:
            config = read_config()
            if config.sink == "off":
                _process_off = True
                return None
            check_region(config)
            _process = Exporter(config).start()
            log.info("CloudWatch export on: %s to namespace %s every %.0f s", config.sink,
                     config.namespace, config.flush_interval_s)
    return _process


def reset_process_exporter() -> None:
    """Forget this process's exporter (tests), closing it if one runs."""
    global _process, _process_off
    with _process_lock:
        if _process is not None:
            _process.close()
        _process, _process_off = None, False

