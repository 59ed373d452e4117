"""OpenTelemetry tracing for Keel: OTLP/HTTP export, Keel's spans, W3C carriers. No Ray here.

Ray Serve 2.60 already traces every request (``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH``):
it sets the tracer provider in each replica (sampler ``ParentBasedTraceIdRatio`` of
``RAY_SERVE_TRACING_SAMPLING_RATIO``), opens a ``replica_handle_request`` span around each
request a replica handles (from the HTTP ``traceparent`` header on the ingress), a
``route_to_replica`` span around each handle call, carries the W3C context to the next
replica in the request metadata, and runs a ``@serve.batch`` under the first request's
context. Keel plugs into that instead of building a second pipeline:

* :func:`otlp_span_processors` is what the exporter hook returns (via the zero-argument
  ``deployments.observability.serve_tracing:span_processors``): an OTLP/HTTP exporter
  behind a batch processor, configured from the standard ``OTEL_EXPORTER_OTLP_*``
  variables, plus a processor that stamps Keel's replica attributes on every span.
* :func:`span` opens Keel's own spans (``keel.request``, ``keel.cache.fetch``, ...) as
  children of the current context. It is a no-op unless the hook ran in this process
  and the current request is sampled: Keel never starts a trace of its own, so Ray's
  one sampling decision (at the first replica) holds for the whole request.
* :func:`carrier` / :func:`links` move a span's W3C context into a batch: a batch span
  is the child of the first request (Ray's choice) and links to every request it served.

Exporting never raises into a request: spans are queued in memory and sent by the batch
processor's thread; an exporter that is down costs a logged warning and dropped spans.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from deployments.settings import TracingSettings

log = logging.getLogger(__name__)

#: Where spans go: the per-signal variable wins, as in every OpenTelemetry SDK.
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TRACER_NAME = "keel"

_PROPAGATOR = TraceContextTextMapPropagator()
#: Set once in a process when Ray's exporter hook installed Keel's exporter; the only
#: thing :func:`span` checks when tracing is off.
_enabled = False
#: Stamped on every span of this process (application, deployment, model).
_replica_attributes: dict[str, str] = {}


def otlp_endpoint(settings: TracingSettings | None = None) -> str | None:
    """The OTLP/HTTP traces URL, or ``None`` (tracing stays off).

    As the SDK does: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is used as given, the generic
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` gets ``/v1/traces`` appended.
    """
    return (settings or TracingSettings()).traces_endpoint()


def enabled() -> bool:
    """Whether this process exports Keel's spans."""
    return _enabled


def set_replica_attributes(application: str | None, deployment: str | None,
                           model: str | None = None) -> None:
    """Name this process's replica on every span from now on (and in the resource, when
    called before the tracer provider exists: see :func:`resource_attributes_env`)."""
    for key, value in (("keel.application", application), ("keel.deployment", deployment),
                       ("keel.model", model)):
        if value:
            _replica_attributes[key] = value


def resource_attributes_env(application: str | None, deployment: str | None,
                            settings: TracingSettings | None = None) -> dict[str, str]:
    """``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` for a replica.

    Ray builds the tracer provider itself, with the SDK's default resource, which reads
    these two variables; setting them in the replica before that is the one way to give
    its spans a resource. ``service.name`` is ``<OTEL_SERVICE_NAME or keel>.<deployment>``
    so Jaeger and Tempo list each deployment as a service; attributes already in
    ``OTEL_RESOURCE_ATTRIBUTES`` are kept.
    """
    settings = settings or TracingSettings()
    base = settings.service_name.strip() or "keel"
    extra = {"keel.application": application, "keel.deployment": deployment,
             "process.pid": str(os.getpid())}
    pairs = [f"{key}={quote(value, safe='')}" for key, value in extra.items() if value]
    existing = settings.resource_attributes.strip()
    return {
        "OTEL_SERVICE_NAME": f"{base}.{deployment}" if deployment else base,
        "OTEL_RESOURCE_ATTRIBUTES": ",".join(([existing] if existing else []) + pairs),
    }


class ReplicaAttributes(SpanProcessor):
    """Puts ``keel.application``/``keel.deployment``/``keel.model`` on every span started
    here, Ray's included, so a span can be filtered by model in any backend."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if _replica_attributes:
            span.set_attributes(_replica_attributes)

    def on_end(self, span: ReadableSpan) -> None:
        pass


def otlp_span_processors(settings: TracingSettings | None = None) -> list[SpanProcessor]:
    """The span processors for Ray's exporter hook: OTLP/HTTP when an endpoint is set.

    With no endpoint the list is empty and Keel's spans stay off (Ray's own spans are
    then created and dropped; unset ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` to avoid
    even that). The batch processor reads ``OTEL_BSP_SCHEDULE_DELAY`` and friends; the
    exporter reads ``OTEL_EXPORTER_OTLP_*`` (headers, timeout, certificate).
    """
    global _enabled
    endpoint = otlp_endpoint(settings)
    if endpoint is None:
        log.warning("tracing hook installed but no OTLP endpoint is set (%s): spans are "
                    "dropped", " / ".join(ENDPOINT_VARS))
        return []
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # Headers, timeout, compression and certificates: the exporter's own OTEL_* reads.
        processors: list[SpanProcessor] = [ReplicaAttributes(),
                                           BatchSpanProcessor(OTLPSpanExporter(endpoint))]
    except Exception as exc:  # a bad variable must not stop the replica
        log.error("tracing off: the OTLP exporter could not be built: %r", exc)
        return []
    _enabled = True
    log.info("tracing: OTLP/HTTP spans to %s", endpoint)
    instrument_client_libraries()
    return processors


class ChildSpansOnly(trace.TracerProvider):
    """Tracers whose spans exist only inside a sampled span: a Redis command or a query
    becomes a child of the request that made it, and never starts a trace of its own
    (health checks, SLO pushes and warm-up calls would each be a sampled root).

    It defers to the global provider at each span, so it may be handed to an
    instrumentation before Ray sets that provider.
    """

    def get_tracer(self, instrumenting_module_name: str,
                   instrumenting_library_version: str | None = None,
                   schema_url: str | None = None,
                   attributes: Any = None) -> trace.Tracer:
        return _ChildTracer(instrumenting_module_name, instrumenting_library_version,
                            schema_url)


class _ChildTracer(trace.Tracer):
    def __init__(self, name: str, version: str | None, schema_url: str | None) -> None:
        self._scope = (name, version, schema_url)

    def start_span(self, name: str, context: Context | None = None,
                   *args: Any, **kwargs: Any) -> trace.Span:
        if not trace.get_current_span(context).get_span_context().trace_flags.sampled:
            return trace.INVALID_SPAN
        tracer = trace.get_tracer(self._scope[0], self._scope[1], schema_url=self._scope[2])
        return tracer.start_span(name, context, *args, **kwargs)

    @contextmanager
    def start_as_current_span(  # type: ignore[override]  # a generator context manager
            self, name: str, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
            attributes: Mapping[str, Any] | None = None, links: Sequence[Link] | None = None,
            start_time: int | None = None, record_exception: bool = True,
            set_status_on_exception: bool = True, end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        started = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(started, end_on_exit=end_on_exit,
                            record_exception=record_exception,
                            set_status_on_exception=set_status_on_exception) as current:
            yield current


#: The client libraries whose calls become spans when tracing is on, by what they talk to.
CLIENT_INSTRUMENTATIONS = {
    "redis": "opentelemetry.instrumentation.redis:RedisInstrumentor",
    "postgresql": "opentelemetry.instrumentation.psycopg:PsycopgInstrumentor",
}
_instrumented: set[str] = set()


def instrument_client_libraries() -> list[str]:
    """redis-py (sync and asyncio: the caches, Feast's Redis online store) and psycopg 3
    (Feast's PostgreSQL offline store and registry) calls become child spans of the
    request that makes them (:class:`ChildSpansOnly`). Once per process; what cannot be
    instrumented is logged, never raised. Returns what is instrumented now."""
    import importlib

    for system, path in CLIENT_INSTRUMENTATIONS.items():
        if system in _instrumented:
            continue
        module, _, cls = path.partition(":")
        try:
            instrumentor = getattr(importlib.import_module(module), cls)()
            instrumentor.instrument(tracer_provider=ChildSpansOnly())
        except Exception as exc:  # a missing or broken instrumentation: spans without it
            log.warning("tracing: %s calls are not traced: %r", system, exc)
            continue
        _instrumented.add(system)
    return sorted(_instrumented)


def _recording_parent() -> bool:
    return trace.get_current_span().get_span_context().trace_flags.sampled


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, *,
         kind: SpanKind = SpanKind.INTERNAL, links: list[Link] | None = None,
         **more: Any) -> Iterator[trace.Span | None]:
    """A child span of the current (sampled) request, made current for the block.

    Attributes come from ``attributes`` (for dotted names, ``{"keel.model": ...}``) and
    keyword arguments; ``None`` values are left out.

    Yields ``None`` when tracing is off or the request is not sampled, so callers that
    add attributes later write ``if s: s.set_attribute(...)``. An exception leaving the
    block is recorded on the span and re-raised unchanged.
    """
    if not _enabled or not _recording_parent():
        yield None
        return
    try:
        current = trace.get_tracer(TRACER_NAME).start_span(
            name, kind=kind, links=links,
            attributes={k: v for k, v in {**(attributes or {}), **more}.items()
                        if v is not None})
    except Exception as exc:  # tracing must never fail a request
        log.debug("span %s not started: %r", name, exc)
        yield None
        return
    # Records an escaping exception on the span, sets its status to ERROR, re-raises it.
    with trace.use_span(current, end_on_exit=True):
        yield current


def carrier() -> dict[str, str] | None:
    """The current span's W3C context (``traceparent``/``tracestate``), or ``None``."""
    if not _enabled or not _recording_parent():
        return None
    out: dict[str, str] = {}
    _PROPAGATOR.inject(out)
    return out or None


def links(carriers: list[dict[str, str] | None]) -> list[Link]:
    """Span links to each carrier's span (absent and malformed carriers are skipped)."""
    out: list[Link] = []
    seen: set[tuple[int, int]] = set()
    for item in carriers:
        if not item:
            continue
        context = trace.get_current_span(_PROPAGATOR.extract(item)).get_span_context()
        key = (context.trace_id, context.span_id)
        if context.is_valid and key not in seen:
            seen.add(key)
            out.append(Link(context))
    return out


def extract(item: Mapping[str, str] | None) -> Context | None:
    """A context from a W3C carrier (for callers that parent on it), or ``None``."""
    if not item:
        return None
    return _PROPAGATOR.extract(dict(item))
