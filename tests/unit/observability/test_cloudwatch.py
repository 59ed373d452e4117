"""The CloudWatch export without Ray's runtime: settings refused by name, the aggregate,
EMF documents checked against the Embedded Metric Format specification, PutMetricData
batches sent to a real CloudWatch API server (moto's server mode) and read back with
boto3, failing sinks that never reach the caller, and the SLO dashboard tied to what the
exporter writes."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.errors import ConfigError
from deployments.observability import catalog, cloudwatch
from deployments.observability.catalog import MetricSpec
from deployments.observability.cloudwatch import CloudWatchConfig, Exporter
from deployments.observability.slo import SloConfig
from graph import cloudwatch_dashboard as dashboard
from tests.support.emf import assert_emf

ROOT = Path(__file__).resolve().parents[3]
ROUTE = "/v2/models/{name}/infer"
LATENCY_TAGS = {"http_route": ROUTE, "model": "linear", "version": "1"}
REQUEST_TAGS = {**LATENCY_TAGS, "status": "200"}


class Recorded:
    """Stands in for a Ray metric: remembers the calls (the wrapper must pass them on)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str] | None]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("set", value, tags))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("observe", value, tags))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _no_process_exporter() -> Iterator[None]:
    cloudwatch.reset_process_exporter()
    yield
    cloudwatch.reset_process_exporter()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("KEEL_CLOUDWATCH_", "AWS_")):
            monkeypatch.delenv(name)
    return monkeypatch


# --- settings ----------------------------------------------------------------------------


def test_defaults_are_off_and_sane(clean_env: pytest.MonkeyPatch) -> None:
    config = cloudwatch.read_config()
    assert config == CloudWatchConfig()
    assert config.sink == "off" and config.namespace == "Keel"
    assert config.flush_interval_s == 60 and config.emf_file == ""
    assert cloudwatch.process_exporter() is None


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("KEEL_CLOUDWATCH_SINK", "kinesis", "not one of off, emf, put_metric_data"),
    ("KEEL_CLOUDWATCH_NAMESPACE", "", "empty"),
    ("KEEL_CLOUDWATCH_NAMESPACE", "   ", "empty"),
    ("KEEL_CLOUDWATCH_NAMESPACE", "Keel prod", "at most 255"),
    ("KEEL_CLOUDWATCH_NAMESPACE", "AWS/Keel", "reserved"),
    ("KEEL_CLOUDWATCH_DIMENSIONS", ",".join(f"d{i}" for i in range(31)), "at most 30"),
    ("KEEL_CLOUDWATCH_DIMENSIONS", "application,replica", "unknown ['replica']"),
    ("KEEL_CLOUDWATCH_DIMENSIONS", "model,model", "duplicates"),
    ("KEEL_CLOUDWATCH_ROLLUP_DIMENSIONS", "deployment", "a rollup is a subset"),
    ("KEEL_CLOUDWATCH_UNITS", "keel_request_latency_ms=Fortnights", "not a CloudWatch unit"),
    ("KEEL_CLOUDWATCH_UNITS", "keel_nope=Count", "expected <catalog metric>=<unit>"),
    ("KEEL_CLOUDWATCH_FLUSH_INTERVAL_S", "0", "must be in (0, 3600]"),
    ("KEEL_CLOUDWATCH_FLUSH_INTERVAL_S", "soon", "valid number"),
    ("KEEL_CLOUDWATCH_TIMEOUT_S", "-1", "must be in (0, 60]"),
])
def test_malformed_settings_are_refused_naming_the_variable(
        clean_env: pytest.MonkeyPatch, variable: str, value: str, says: str) -> None:
    clean_env.setenv("KEEL_CLOUDWATCH_SINK", "emf")
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        cloudwatch.read_config()
    assert refused.value.message.startswith(f"{variable}: "), refused.value.message
    assert says in refused.value.message
    # ... and at start: the replica's first metric raises it
    with pytest.raises(ConfigError, match=re.escape(variable)):
        cloudwatch.process_exporter()


def test_put_metric_data_without_a_region_refuses_to_start(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("KEEL_CLOUDWATCH_SINK", "put_metric_data")
    clean_env.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"^KEEL_CLOUDWATCH_REGION: no AWS region"):
        cloudwatch.process_exporter()
    clean_env.setenv("KEEL_CLOUDWATCH_REGION", "eu-west-1")
    exporter = cloudwatch.process_exporter()
    assert exporter is not None and exporter.config.region == "eu-west-1"


def test_dimension_sets_follow_the_settings() -> None:
    config = CloudWatchConfig()
    assert config.dimension_sets(catalog.REQUESTS) == [
        ("application", "http_route", "model", "version", "status"), ("application",)]
    assert config.dimension_sets(catalog.SLO_VALUE) == [("application", "slo", "window")]
    assert config.unit(catalog.REQUEST_LATENCY) == "Milliseconds"
    assert config.unit(catalog.FEATURE_AGE) == "Seconds"
    assert config.unit(catalog.LLM_COST) == "None"
    assert config.unit(catalog.REQUESTS) == "Count"
    picked = CloudWatchConfig(dimensions=("application", "deployment", "model"),
                              rollup_dimensions=("deployment",))
    assert picked.dimension_sets(catalog.REQUESTS) == [
        ("application", "deployment", "model"), ("deployment",)]
    assert picked.dimension_sets(catalog.FEATURE_BATCH_SIZE) == [
        ("application", "deployment"), ("deployment",)]


# --- the aggregate -----------------------------------------------------------------------


def test_the_wrapper_passes_every_call_on_and_aggregates() -> None:
    exporter = Exporter(CloudWatchConfig(sink="emf"))
    ray_side = Recorded()
    metric = exporter.wrap(catalog.REQUESTS, ray_side, application="keel",
                           deployment="Ingress")
    tags = {"http_route": ROUTE, "model": "linear", "version": "1", "status": "200"}
    metric.inc(1, tags=tags)
    metric.inc(2, tags=tags)
    assert ray_side.calls == [("inc", 1, tags), ("inc", 2, tags)]
    snapshot = exporter.aggregate.drain()
    assert snapshot.counters == {
        ("keel_requests_total", ("keel", ROUTE, "linear", "1", "200")): 3.0}
    assert not len(exporter.aggregate.drain()), "counters start again after a drain"


def test_gauges_keep_their_last_value_across_flushes() -> None:
    exporter = Exporter(CloudWatchConfig(sink="emf"))
    gauge = exporter.wrap(catalog.CACHE_HIT_RATIO, Recorded(), application="keel")
    gauge.set(0.2, tags={"model": "linear"})
    gauge.set(0.4, tags={"model": "linear"})
    assert exporter.aggregate.drain().gauges == {
        ("keel_cache_hit_ratio", ("keel", "linear")): 0.4}
    assert exporter.aggregate.drain().gauges == {
        ("keel_cache_hit_ratio", ("keel", "linear")): 0.4}


def test_histograms_keep_exact_count_sum_min_max_and_per_bucket_means() -> None:
    exporter = Exporter(CloudWatchConfig(sink="emf"))
    latency = exporter.wrap(catalog.MODEL_LATENCY, Recorded(), application="keel")
    for value in (0.5, 1.0, 24.0, 25.0, 26.0, 79.0, 80.0, 20000.0):
        latency.observe(value, tags={"model": "linear"})
    (histogram,) = exporter.aggregate.drain().histograms.values()
    assert histogram.count == 8 and histogram.total == pytest.approx(20235.5)
    assert histogram.min == 0.5 and histogram.max == 20000.0
    values, counts = histogram.values_counts()
    # bucket bounds are upper bounds (le): 25 is in (20, 25], 26 in (25, 30]
    assert list(zip(values, counts, strict=True)) == [
        (0.75, 2.0), (24.5, 2.0), (26.0, 1.0), (79.5, 2.0), (20000.0, 1.0)]
    assert sum(v * c for v, c in zip(values, counts, strict=True)) == pytest.approx(20235.5)


def test_concurrent_recording_loses_nothing() -> None:
    exporter = Exporter(CloudWatchConfig(sink="emf"))
    counter = exporter.wrap(catalog.CACHE_ERRORS, Recorded())
    batch = exporter.wrap(catalog.FEATURE_BATCH_SIZE, Recorded())
    n, threads = 5000, 8

    def work() -> None:
        for i in range(n):
            counter.inc(1, tags={"operation": "get"})
            batch.observe(1 + i % 7)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    snapshot = exporter.aggregate.drain()
    assert list(snapshot.counters.values()) == [n * threads]
    assert next(iter(snapshot.histograms.values())).count == n * threads


def test_a_value_that_cannot_be_recorded_is_counted_not_raised() -> None:
    exporter = Exporter(CloudWatchConfig(sink="emf"))
    seen: list[tuple[str, int]] = []
    exporter.on_error = lambda operation, count: seen.append((operation, count))
    metric = exporter.wrap(catalog.REQUESTS, Recorded())
    metric.inc(1, tags={"model": "linear"})  # Ray would refuse this; a fake does not
    assert exporter.errors["record"] == 1 and seen == [("record", 1)]
    latency = exporter.wrap(catalog.MODEL_LATENCY, Recorded())
    for bad in (math.nan, math.inf, -math.inf):
        latency.observe(bad, tags={"model": "linear"})
    assert exporter.errors["record"] == 4
    assert not len(exporter.aggregate.drain()), "nothing CloudWatch would refuse is kept"


# --- EMF ---------------------------------------------------------------------------------


def _emf_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_emf_documents_meet_the_specification_and_carry_the_values(tmp_path: Path) -> None:
    out = tmp_path / "emf.log"
    exporter = Exporter(CloudWatchConfig(sink="emf", emf_file=str(out), namespace="KeelTest"))
    requests = exporter.wrap(catalog.REQUESTS, Recorded(), application="keel",
                             deployment="Ingress")
    latency = exporter.wrap(catalog.REQUEST_LATENCY, Recorded(), application="keel",
                            deployment="Ingress")
    slo = exporter.wrap(catalog.SLO_VALUE, Recorded(), application="keel")
    for i in range(30):
        requests.inc(1, tags=REQUEST_TAGS)
        latency.observe(2.0 + i, tags=LATENCY_TAGS)
    requests.inc(1, tags={"http_route": ROUTE, "model": "", "version": "", "status": "404"})
    slo.set(21.5, tags={"slo": "api_p95", "window": "5m"})
    assert exporter.flush() == 4
    docs = _emf_lines(out)
    declared = {d for doc in docs for d in assert_emf(doc)}
    assert ("KeelTest", "keel_requests_total", ("application",)) in declared
    assert ("KeelTest", "keel_request_latency_ms",
            ("application", "http_route", "model", "version")) in declared
    ok = next(d for d in docs if d.get("status") == "200")
    assert ok["keel_requests_total"] == 30 and ok["model"] == "linear"
    assert ok["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [
        ["application", "http_route", "model", "version", "status"], ["application"]]
    missing = next(d for d in docs if d.get("status") == "404")
    assert missing["model"] == cloudwatch.NO_VALUE, "empty tag values become 'none'"
    hist = next(d for d in docs if "keel_request_latency_ms" in d)["keel_request_latency_ms"]
    assert hist["Count"] == 30 and hist["Sum"] == pytest.approx(sum(2.0 + i for i in range(30)))
    assert hist["Min"] == 2.0 and hist["Max"] == 31.0
    gauge = next(d for d in docs if "keel_slo_value" in d)
    assert gauge["keel_slo_value"] == 21.5 and gauge["slo"] == "api_p95"
    assert gauge["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [
        ["application", "slo", "window"]], "gauges have no rollup"
    # a second flush: only the gauge (a state) again; counters had no new data
    assert exporter.flush() == 1


def test_more_than_100_metrics_are_split_across_documents(tmp_path: Path) -> None:
    out = tmp_path / "emf.log"
    exporter = Exporter(CloudWatchConfig(sink="emf", emf_file=str(out)))
    for i in range(250):
        spec = MetricSpec(f"keel_synthetic_{i}_total", "counter", "", ())
        exporter.wrap(spec, Recorded(), application="keel").inc(i + 1)
    exporter.flush()
    docs = _emf_lines(out)
    sizes = [len(doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]) for doc in docs]
    assert sizes == [100, 100, 50]
    values = {k: v for doc in docs for k, v in doc.items() if k.startswith("keel_synthetic")}
    assert values == {f"keel_synthetic_{i}_total": i + 1 for i in range(250)}
    for doc in docs:
        assert_emf(doc)


def test_emf_to_stdout_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    exporter = Exporter(CloudWatchConfig(sink="emf"))
    exporter.wrap(catalog.FEATURE_BATCH_SIZE, Recorded(), application="keel").observe(3)
    assert exporter.flush() == 1
    (line,) = capsys.readouterr().out.splitlines()
    doc = json.loads(line)
    assert_emf(doc)
    assert doc["keel_feature_batch_size"]["Values"] == [3.0]


def test_the_library_writes_what_we_write_for_plain_values() -> None:
    """Our documents are the library's own: the same MetricsContext through its logger
    API (set_namespace, put_dimensions, put_metric) serialises identically."""
    from aws_embedded_metrics.logger.metrics_context import MetricsContext
    from aws_embedded_metrics.logger.metrics_logger import MetricsLogger
    from aws_embedded_metrics.serializers.log_serializer import LogSerializer

    async def no_environment() -> Any:
        raise AssertionError("not flushed")

    exporter = Exporter(CloudWatchConfig(sink="emf", rollup_dimensions=()))
    exporter.wrap(catalog.CACHE_ERRORS, Recorded(), application="keel").inc(
        4, tags={"operation": "mget"})
    snapshot = exporter.aggregate.drain()
    (ours,) = cloudwatch.emf_documents(snapshot, exporter.infos, "Keel", 1_700_000_000_000)
    logger = MetricsLogger(no_environment, MetricsContext())
    logger.set_namespace("Keel")
    logger.set_dimensions({"application": "keel", "operation": "mget"})
    logger.put_metric("keel_cache_errors_total", 4.0, "Count")
    logger.context.meta["Timestamp"] = 1_700_000_000_000
    (theirs,) = LogSerializer.serialize(logger.context)
    assert json.loads(ours) == json.loads(theirs)


# --- PutMetricData against a real CloudWatch API (moto's server) -------------------------


@pytest.fixture(scope="module")
def cloudwatch_api() -> Iterator[str]:
    """moto's server speaking the CloudWatch API on a free port, in a subprocess."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None, "moto's server exited"
                assert time.monotonic() < deadline, "moto's server did not start in 30 s"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def aws_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    clean_env.setenv("AWS_ACCESS_KEY_ID", "testing")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    clean_env.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    clean_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    return clean_env


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client("cloudwatch", region_name="us-east-1", endpoint_url=endpoint)


def _all_metrics(client: Any, namespace: str) -> list[dict[str, Any]]:
    metrics: list[dict[str, Any]] = []
    for page in client.get_paginator("list_metrics").paginate(Namespace=namespace):
        metrics += page["Metrics"]
    return metrics


def _statistics(client: Any, namespace: str, name: str, dims: dict[str, str]
                ) -> dict[str, float]:
    now = dt.datetime.now(dt.UTC)
    points = client.get_metric_statistics(
        Namespace=namespace, MetricName=name,
        Dimensions=[{"Name": k, "Value": v} for k, v in dims.items()],
        StartTime=now - dt.timedelta(minutes=10), EndTime=now + dt.timedelta(minutes=10),
        Period=3600, Statistics=["SampleCount", "Sum", "Maximum", "Minimum"])["Datapoints"]
    assert len(points) == 1, points
    return {k: points[0][k] for k in ("SampleCount", "Sum", "Maximum", "Minimum")}


def test_batches_respect_the_count_and_size_limits() -> None:
    data = [{"MetricName": f"m{i}", "Value": 1.0,
             "Dimensions": [{"Name": "application", "Value": "keel"}]} for i in range(2500)]
    calls = cloudwatch.batches(data)
    assert [len(c) for c in calls] == [1000, 1000, 500]
    assert [d for c in calls for d in c] == data
    wide = [{"MetricName": "m", "Values": [1.0] * 150, "Counts": [1.0] * 150,
             "Dimensions": [{"Name": f"d{i}", "Value": "v" * 200} for i in range(30)]}] * 200
    calls = cloudwatch.batches(wide)
    assert len(calls) > 1
    assert all(sum(map(cloudwatch.datum_bytes, c)) <= cloudwatch.MAX_CALL_BYTES
               for c in calls)


def test_put_metric_data_batches_reach_cloudwatch_and_read_back(
        cloudwatch_api: str, aws_env: pytest.MonkeyPatch) -> None:
    namespace = "KeelBatches"
    config = CloudWatchConfig(sink="put_metric_data", namespace=namespace,
                              region="us-east-1", endpoint_url=cloudwatch_api)
    exporter = Exporter(config)
    requests = exporter.wrap(catalog.REQUESTS, Recorded(), application="keel")
    latency = exporter.wrap(catalog.REQUEST_LATENCY, Recorded(), application="keel")
    slo = exporter.wrap(catalog.SLO_COMPLIANT, Recorded(), application="keel")
    routes = [f"/r{i}" for i in range(1200)]  # 1200 series: more than one call's 1000
    for route in routes:
        requests.inc(2, tags={**REQUEST_TAGS, "http_route": route})
    observed = [0.5, 3.0, 3.0, 24.9, 25.0, 79.0, 81.0, 4000.0]
    for value in observed:
        latency.observe(value, tags=LATENCY_TAGS)
    slo.set(1, tags={"slo": "api_p95", "window": "5m"})
    calls = exporter.flush()
    assert exporter.errors == {}, exporter.errors
    # 1200 request series + their rollup + 1 latency series + its rollup + 1 gauge
    assert calls == 2
    client = _client(cloudwatch_api)
    names = [m for m in _all_metrics(client, namespace)
             if m["MetricName"] == "keel_requests_total"]
    assert len(names) == 1201
    full = {tuple(sorted(d["Name"] for d in m["Dimensions"])) for m in names}
    assert full == {("application", "http_route", "model", "status", "version"), ("application",)}
    one = _statistics(client, namespace, "keel_requests_total",
                      {"application": "keel", "http_route": "/r7", "model": "linear",
                       "version": "1", "status": "200"})
    assert one["Sum"] == 2
    # moto matches every series whose dimensions INCLUDE the ones asked for (CloudWatch
    # matches them exactly), so asking for the rollup also sums the full series: twice
    # the rollup's own figures, as long as the rollup equals the sum of the full series.
    both = 2
    rollup = _statistics(client, namespace, "keel_requests_total", {"application": "keel"})
    assert rollup["Sum"] == both * 2 * len(routes)
    hist = _statistics(client, namespace, "keel_request_latency_ms", {"application": "keel"})
    assert hist["SampleCount"] == both * len(observed)
    assert hist["Sum"] == pytest.approx(both * sum(observed))
    assert hist["Maximum"] == 4000.0  # alone in its bucket: its mean is itself
    assert hist["Minimum"] == 0.5
    exact = _statistics(client, namespace, "keel_request_latency_ms",
                        {"application": "keel", "http_route": ROUTE, "model": "linear",
                         "version": "1"})
    assert exact["SampleCount"] == len(observed)
    assert exact["Sum"] == pytest.approx(sum(observed))
    gauge = _statistics(client, namespace, "keel_slo_compliant",
                        {"application": "keel", "slo": "api_p95", "window": "5m"})
    assert gauge["Maximum"] == 1


# --- faults: nothing reaches the caller, everything is counted ---------------------------


def _busy(exporter: Exporter) -> None:
    requests = exporter.wrap(catalog.REQUESTS, Recorded(), application="keel")
    latency = exporter.wrap(catalog.REQUEST_LATENCY, Recorded(), application="keel")
    for i in range(100):
        requests.inc(1, tags=REQUEST_TAGS)
        latency.observe(float(i), tags=LATENCY_TAGS)


@pytest.mark.parametrize("where", ["a directory", "a missing directory"])
def test_an_unwritable_emf_file_is_counted_and_logged_once_per_interval(
        tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path if where == "a directory" else tmp_path / "gone" / "emf.log"
    exporter = Exporter(CloudWatchConfig(sink="emf", emf_file=str(path),
                                         flush_interval_s=3600))
    seen: list[tuple[str, int]] = []
    exporter.on_error = lambda operation, count: seen.append((operation, count))
    with caplog.at_level(logging.WARNING, logger=cloudwatch.__name__):
        for _ in range(3):
            _busy(exporter)  # never raises
            assert exporter.flush() == 0
    assert exporter.errors == {"emf": 3} and seen == [("emf", 1)] * 3
    warnings = [r for r in caplog.records if "CloudWatch export (emf) failed" in r.message]
    assert len(warnings) == 1, "logged at most once per interval"


def test_a_cloudwatch_endpoint_that_is_down_is_counted(aws_env: pytest.MonkeyPatch) -> None:
    config = CloudWatchConfig(sink="put_metric_data", region="us-east-1",
                              endpoint_url=f"http://127.0.0.1:{_free_port()}", timeout_s=1)
    exporter = Exporter(config)
    _busy(exporter)
    started = time.monotonic()
    assert exporter.flush() == 0
    assert time.monotonic() - started < 10
    assert exporter.errors == {"put_metric_data": 1}  # one call's worth of data, failed
    _busy(exporter)  # recording goes on as before


def test_the_flusher_thread_ships_on_its_own(tmp_path: Path) -> None:
    out = tmp_path / "emf.log"
    exporter = Exporter(CloudWatchConfig(sink="emf", emf_file=str(out),
                                         flush_interval_s=0.05)).start()
    try:
        _busy(exporter)
        deadline = time.monotonic() + 10
        while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert exporter.flushes >= 1
    finally:
        exporter.close()
    assert exporter._thread is not None and not exporter._thread.is_alive()
    for doc in _emf_lines(out):
        assert_emf(doc)


# --- ray_metrics.make: untouched when off, wrapped when on ------------------------------


def test_make_returns_rays_own_metric_when_the_sink_is_off(
        clean_env: pytest.MonkeyPatch) -> None:
    from ray.serve.metrics import Counter, Gauge, Histogram

    from deployments.observability.ray_metrics import make

    assert type(make(catalog.REQUESTS)) is Counter
    assert type(make(catalog.CACHE_HIT_RATIO)) is Gauge
    assert type(make(catalog.REQUEST_LATENCY)) is Histogram


def test_make_wraps_when_the_sink_is_on(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from deployments.observability.ray_metrics import make

    clean_env.setenv("KEEL_CLOUDWATCH_SINK", "emf")
    clean_env.setenv("KEEL_CLOUDWATCH_EMF_FILE", str(tmp_path / "emf.log"))
    metric = make(catalog.REQUESTS)
    assert isinstance(metric, cloudwatch.ExportedMetric)
    metric.inc(1, tags=REQUEST_TAGS)
    exporter = cloudwatch.process_exporter()
    assert exporter is not None and exporter.on_error is not None
    assert exporter.flush() == 1
    (doc,) = _emf_lines(tmp_path / "emf.log")
    assert doc["application"] == cloudwatch.NO_VALUE  # outside Serve: no replica identity
    assert doc["keel_requests_total"] == 1


# --- the dashboard -----------------------------------------------------------------------


def test_the_committed_dashboard_is_fresh() -> None:
    committed = (ROOT / dashboard.DASHBOARD_PATH).read_text()
    assert committed == dashboard.dumps(dashboard.render()), \
        "stale: run `keel render-cloudwatch`"
    from graph.cli import main

    assert main(["render-cloudwatch", "--root", str(ROOT), "--check"]) == 0


def test_render_cloudwatch_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    from graph.cli import main

    out = tmp_path / "dash.json"
    assert main(["render-cloudwatch", "--out", str(out), "--check"]) == 1
    assert main(["render-cloudwatch", "--out", str(out)]) == 0
    assert main(["render-cloudwatch", "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text().replace("api_p95", "api_p96"))
    assert main(["render-cloudwatch", "--out", str(out), "--check"]) == 1


def test_every_dashboard_metric_is_one_the_exporter_writes() -> None:
    """namespace + name + dimension names, as the Prometheus test ties rule names."""
    config = CloudWatchConfig()
    body = json.loads((ROOT / dashboard.DASHBOARD_PATH).read_text())
    written = {(config.namespace, spec.name, dims): spec
               for spec in catalog.ALL for dims in config.dimension_sets(spec)}
    references = dashboard.metric_references(body)
    assert len(references) > 20
    for namespace, name, dims, stat in references:
        spec = written.get((namespace, name, dims))
        assert spec is not None, f"the exporter writes no {namespace}/{name} by {dims}"
        if re.fullmatch(r"p\d+(\.\d+)?", stat):
            assert spec.kind == "histogram", f"{name}: a percentile of a {spec.kind}"


def test_the_dashboard_shows_every_objective_against_its_target() -> None:
    body = json.loads((ROOT / dashboard.DASHBOARD_PATH).read_text())
    rows = [row for w in body["widgets"] for row in w.get("properties", {}).get("metrics", [])
            if isinstance(row[0], str)]
    targets = {(a["label"], a["value"]) for w in body["widgets"]
               for a in w.get("properties", {}).get("annotations", {}).get("horizontal", [])}
    for objective in SloConfig().objectives:
        shown = [r for r in rows if r[1] == catalog.SLO_VALUE.name and objective.name in r]
        assert shown, f"{objective.name}: no keel_slo_value line"
        budget = [r for r in rows if r[1] == catalog.SLO_BUDGET.name and objective.name in r]
        assert budget, f"{objective.name}: no error budget line"
        assert any(value == objective.target_value and objective.name in label
                   for label, value in targets), f"{objective.name}: no target line"
    assert ("api_p50 target ≤ 25 ms", 25) in targets
    assert ("api_p95 target ≤ 80 ms", 80) in targets
    assert ("model_p95 target ≤ 50 ms", 50) in targets
    assert ("target 0.05 USD", 0.05) in targets
    titles = [w["properties"].get("title", "") for w in body["widgets"]]
    assert any("cost per monthly active user" in t for t in titles)
    widths = {(w["x"], w["y"]) for w in body["widgets"]}
    assert len(widths) == len(body["widgets"]), "no two widgets in one place"


def test_the_dashboard_follows_the_exporters_dimensions() -> None:
    config = CloudWatchConfig(dimensions=("application", "deployment", "tags"),
                              rollup_dimensions=("application", "deployment"))
    body = dashboard.render(config)
    rows = [r for w in body["widgets"] for r in w["properties"].get("metrics", [])
            if isinstance(r[0], str)]
    slo_row = next(r for r in rows if r[1] == catalog.SLO_VALUE.name)
    assert slo_row[2:6] == ["application", "keel", "deployment", "SloMonitor"]
    written = {(config.namespace, spec.name, dims)
               for spec in catalog.ALL for dims in config.dimension_sets(spec)}
    for namespace, name, dims, _ in dashboard.metric_references(body):
        assert (namespace, name, dims) in written
    with pytest.raises(ConfigError, match="slo"):
        dashboard.render(CloudWatchConfig(dimensions=("application", "model")))
