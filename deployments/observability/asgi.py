"""``keel.request``: one span per HTTP request on the ingress (pure ASGI; no Ray here).

It is a child of the span Ray Serve opens for the request it hands to the replica
(``replica_handle_request Ingress ...``, itself continuing an incoming ``traceparent``),
and the parent of everything Keel does for the request. Its name stays ``keel.request``;
the matched route template (``/v1/decide``) is its ``http.route`` attribute.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from deployments.observability import tracing

Scope = dict[str, Any]
Receive = Any
Send = Any


class RequestSpans:
    """ASGI middleware: ``keel.request`` around each HTTP request when tracing is on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or not tracing.enabled():
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "")
        with tracing.span("keel.request", {"http.request.method": method,
                                           "url.path": scope.get("path", "")},
                          kind=SpanKind.SERVER) as span:
            if span is None:
                await self.app(scope, receive, send)
                return
            status: list[int] = []

            async def send_and_record(message: dict[str, Any]) -> None:
                if message.get("type") == "http.response.start":
                    status.append(int(message.get("status", 0)))
                await send(message)

            try:
                await self.app(scope, receive, send_and_record)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    span.set_attribute("http.route", route)
                if status:
                    span.set_attribute("http.response.status_code", status[0])
                    if status[0] >= 500:
                        span.set_status(Status(StatusCode.ERROR))
