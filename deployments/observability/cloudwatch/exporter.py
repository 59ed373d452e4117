"""The sinks (EMF, PutMetricData), the exporter and its flusher thread, one per process."""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import logging
import math
import operator
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from deployments.errors import ConfigError
from deployments.observability.catalog import MetricSpec
from deployments.observability.cloudwatch.aggregate import Aggregate, Histogram, Key, Snapshot
from deployments.observability.cloudwatch.config import (
    MAX_ABS,
    NO_VALUE,
    REPLICA_DIMENSIONS,
    CloudWatchConfig,
    env_variable,
    read_config,
)
from deployments.observability.cloudwatch.documents import (
    SeriesInfo,
    batches,
    emf_documents,
    metric_data,
)

log = logging.getLogger(__name__)


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
        raise ConfigError(f"{env_variable('region')}: no AWS region (set it, or AWS_REGION) "
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
        if not -MAX_ABS <= value <= MAX_ABS:  # NaN, ±Inf: CloudWatch refuses them
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
