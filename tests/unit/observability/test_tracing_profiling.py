"""Tracing and profiling cores without Ray: spans, carriers, links, exporter set-up,
and that an unreachable OTLP endpoint or Pyroscope server never fails the caller."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from deployments.observability import profiling, tracing
from deployments.settings import ProfilingSettings, TracingSettings
from tests.support.env import settings_from

_EXPORTER = InMemorySpanExporter()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, spans kept in memory (the provider is set once)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(tracing.ReplicaAttributes())
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    monkeypatch.setattr(tracing, "_enabled", True)
    monkeypatch.setattr(tracing, "_replica_attributes", {})
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def test_off_by_default_costs_nothing() -> None:
    assert not tracing.enabled()
    with tracing.span("keel.x", {"a": 1}) as span:
        assert span is None
    assert tracing.carrier() is None
    assert tracing.otlp_span_processors(settings_from(TracingSettings, {})) == []
    assert not tracing.enabled()


def test_endpoint_from_the_standard_variables() -> None:
    def endpoint(env: dict[str, str]) -> str | None:
        return tracing.otlp_endpoint(settings_from(TracingSettings, env))

    assert endpoint({}) is None
    assert endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == \
        "http://c:4318/v1/traces"
    assert endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                     "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"}) == "http://t/x"


def test_resource_names_the_replica() -> None:
    env = tracing.resource_attributes_env("keel", "risk_mlp",
                                          settings_from(TracingSettings,
                                                        {"OTEL_RESOURCE_ATTRIBUTES": "team=risk"}))
    assert env["OTEL_SERVICE_NAME"] == "keel.risk_mlp"
    attributes = env["OTEL_RESOURCE_ATTRIBUTES"].split(",")
    assert attributes[0] == "team=risk"
    assert "keel.application=keel" in attributes and "keel.deployment=risk_mlp" in attributes
    assert tracing.resource_attributes_env(
        None, None, settings_from(TracingSettings, {"OTEL_SERVICE_NAME": "svc"}))[
        "OTEL_SERVICE_NAME"] == "svc"


def test_keel_never_starts_a_trace_of_its_own(spans: InMemorySpanExporter) -> None:
    # No sampled parent (Ray did not sample this request): no span, no carrier.
    with tracing.span("keel.request") as span:
        assert span is None
        assert tracing.carrier() is None
    assert spans.get_finished_spans() == ()


def test_children_carriers_links_and_errors(spans: InMemorySpanExporter) -> None:
    tracing.set_replica_attributes("app", "risk_mlp", "risk_mlp")
    tracer = trace.get_tracer("ray-stand-in")
    with tracer.start_as_current_span("replica_handle_request") as root:
        with tracing.span("keel.model.call", {"keel.model": "risk_mlp", "none": None}) as call:
            assert call is not None
            carrier = tracing.carrier()
        assert carrier is not None and carrier["traceparent"].startswith("00-")
        links = tracing.links([carrier, None, {}, {"traceparent": "garbage"}, carrier])
        with (pytest.raises(ValueError, match="boom"),
              tracing.span("keel.model.batch", links=links, size=2)):
            raise ValueError("boom")
    finished = {s.name: s for s in spans.get_finished_spans()}
    model_call, batch = finished["keel.model.call"], finished["keel.model.batch"]
    root_context = root.get_span_context()
    assert model_call.parent is not None and model_call.parent.span_id == root_context.span_id
    assert model_call.context.trace_id == root_context.trace_id
    assert dict(model_call.attributes or {}) == {
        "keel.application": "app", "keel.deployment": "risk_mlp", "keel.model": "risk_mlp"}
    assert [link.context.span_id for link in batch.links] == [model_call.context.span_id]
    assert batch.status.status_code is StatusCode.ERROR
    assert (batch.attributes or {})["size"] == 2
    assert any(event.name == "exception" for event in batch.events)


def test_an_unreachable_collector_never_fails_the_caller(spans: InMemorySpanExporter) -> None:
    processors = tracing.otlp_span_processors(settings_from(
        TracingSettings, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}))
    assert len(processors) == 2
    batch = processors[1]
    tracer = TracerProvider()
    tracer.add_span_processor(batch)
    with tracer.get_tracer("t").start_as_current_span("x"):
        pass
    batch.force_flush(timeout_millis=2000)  # the export fails inside the processor's thread
    tracer.shutdown()


def test_profiling_is_off_without_an_address() -> None:
    assert profiling.server_address(settings_from(ProfilingSettings, {})) is None
    assert not profiling.configure_profiling("app", "Ingress",
                                             settings=settings_from(ProfilingSettings, {}))
    both = {"PYROSCOPE_SERVER_ADDRESS": "http://p:4040", "KEEL_PYROSCOPE_ADDRESS": "http://k:4040"}
    assert profiling.server_address(settings_from(ProfilingSettings, both)) == "http://k:4040"
    assert profiling.profiling_tags("app", "risk_mlp", None) == {
        "application": "app", "deployment": "risk_mlp"}


def test_an_unreachable_pyroscope_server_never_breaks_the_caller() -> None:
    env = settings_from(ProfilingSettings, {
        "PYROSCOPE_SERVER_ADDRESS": f"http://127.0.0.1:{_closed_port()}",
        "PYROSCOPE_SAMPLE_RATE": "1000"})
    try:
        assert profiling.configure_profiling("app", "risk_mlp", "risk_mlp", settings=env)
        # Configured once per process; a second call is harmless.
        assert profiling.configure_profiling("app", "risk_mlp", "risk_mlp", settings=env)
        total = sum(i * i for i in range(200_000))  # the profiled code keeps working
        assert total > 0
    finally:
        profiling.shutdown_profiling()


async def test_redis_and_postgresql_calls_are_children_of_the_request_only(
        spans: InMemorySpanExporter, prefix: str) -> None:
    """The cache's Redis commands and Feast's PostgreSQL queries become child spans of the
    request that made them, on the real servers; outside a sampled span they start no
    trace of their own."""
    import psycopg
    import redis
    import redis.asyncio

    assert tracing.instrument_client_libraries() == ["postgresql", "redis"]
    sync_client = redis.Redis(host="127.0.0.1", port=6379)
    async_client = redis.asyncio.Redis(host="127.0.0.1", port=6379)
    try:
        sync_client.set(f"{prefix}a", b"1")  # no request around it: no span
        await async_client.mget([f"{prefix}a"])
        assert spans.get_finished_spans() == ()

        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("keel.cache.fetch") as parent:
            assert await async_client.mget([f"{prefix}a", f"{prefix}b"]) == [b"1", None]
            async with async_client.pipeline(transaction=False) as pipe:
                pipe.set(f"{prefix}b", b"2", px=60_000)
                await pipe.execute()
            with psycopg.connect("host=127.0.0.1 dbname=test user=postgres",
                                 connect_timeout=5) as connection:
                assert connection.execute("SELECT 1").fetchone() == (1,)
        parent_id = parent.get_span_context().span_id
        children = [s for s in spans.get_finished_spans() if s.name != "keel.cache.fetch"]
        assert {s.parent.span_id for s in children if s.parent} == {parent_id}
        assert len(children) == 3 and all(s.parent for s in children), children
        systems = {s.name: (s.attributes or {}).get("db.system") for s in children}
        assert sorted(systems.values()) == ["postgresql", "redis", "redis"], systems
        assert systems["MGET"] == "redis"
        # Never the keys or values: the command with its arguments masked.
        mget = next(s for s in children if s.name == "MGET")
        assert (mget.attributes or {})["db.statement"] == "MGET ? ?"
    finally:
        sync_client.delete(f"{prefix}a", f"{prefix}b")
        sync_client.close()
        await async_client.aclose()
