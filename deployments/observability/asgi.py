"""One ASGI middleware for the ingress's telemetry: request metrics and ``keel.request``
spans (pure ASGI, no Ray here).

Once each answer is sent, its route template, model, version, status and latency go to the
``RequestObserver`` (metrics and SLO events: after the answer, never before it); an
observer that fails is logged once, never the request's problem. When tracing is on,
the request runs inside a ``keel.request`` span: a child of the span Ray Serve opened
for it (itself continuing an incoming ``traceparent``), and the parent of everything
Keel does for it; its ``http.route`` attribute is the matched route template.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from opentelemetry.trace import SpanKind, Status, StatusCode

from deployments.observability import tracing

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Any
Send = Any

#: Where a route that learns its model from the body leaves it (deployments/ingress/rest/http.py).
MODEL_SCOPE_KEY = "keel.model"
#: Where a serving route leaves the version that answered (the traffic split chose it, or
#: the request pinned it); absent: the label is empty (no version answered).
VERSION_SCOPE_KEY = "keel.version"


class RequestObserver(Protocol):
    """Told about every answered HTTP request (metrics, SLOs)."""

    def request(self, http_route: str, model: str, status: int, latency_ms: float,
                version: str = "") -> None: ...


class GuardedObserver:
    """A ``RequestObserver`` that never fails the request it is told about: a failing one
    is logged once (the REST middleware here and the gRPC service share it)."""

    def __init__(self, observer: RequestObserver) -> None:
        self._observer = observer
        self._failed_once = False

    def request(self, http_route: str, model: str, status: int, latency_ms: float,
                version: str = "") -> None:
        try:
            self._observer.request(http_route, model, status, latency_ms, version)
        except Exception:
            if not self._failed_once:
                self._failed_once = True
                log.exception("request observer failed (logged once)")


class Telemetry:
    """ASGI middleware: request metrics (when an observer is given) and spans (when
    tracing is on), wrapping ``send`` once for both."""

    def __init__(self, app: Any, observer: RequestObserver | None = None) -> None:
        self.app = app
        self.observer = GuardedObserver(observer) if observer is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or (self.observer is None and not tracing.enabled()):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises past every handler

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            if tracing.enabled():
                await self._traced(scope, receive, send_and_note, lambda: status)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            if self.observer is not None:
                self._observe(scope, status, (time.perf_counter() - started) * 1000)

    async def _traced(self, scope: Scope, receive: Receive, send: Send,
                      status: Any) -> None:
        with tracing.span("keel.request", {"http.request.method": scope.get("method", ""),
                                           "url.path": scope.get("path", "")},
                          kind=SpanKind.SERVER) as span:
            try:
                await self.app(scope, receive, send)
            finally:
                if span is not None:
                    route = getattr(scope.get("route"), "path", None)
                    if route:
                        span.set_attribute("http.route", route)
                    code = status()
                    span.set_attribute("http.response.status_code", code)
                    if code >= 500:
                        span.set_status(Status(StatusCode.ERROR))

    def _observe(self, scope: Scope, status: int, latency_ms: float) -> None:
        assert self.observer is not None
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        model = scope.get(MODEL_SCOPE_KEY) or scope.get("path_params", {}).get("name", "")
        self.observer.request(route, str(model), status, latency_ms,
                              str(scope.get(VERSION_SCOPE_KEY) or ""))
