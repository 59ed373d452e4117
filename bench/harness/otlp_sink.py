"""A minimal OTLP/HTTP traces sink for the benchmark: counts spans, keeps nothing else.

``POST /v1/traces`` (protobuf ``ExportTraceServiceRequest``, gzip or not) is decoded
with ``opentelemetry-proto``, its spans are counted (in total, by span name and by
``service.name``) and discarded; the answer is an empty ``ExportTraceServiceResponse``.
``GET /stats`` returns the counts as JSON. Run it as its own process so its CPU is not
taken from the load generator's interpreter (it still shares the machine's cores, as a
collector on the same host would).

    .venv/bin/python -m bench.harness.otlp_sink --port 4318
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()


class SpanCounts:
    """Thread-safe span counters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans = 0
        self.requests = 0
        self.bytes = 0
        self.errors = 0
        self.by_name: Counter[str] = Counter()
        self.by_service: Counter[str] = Counter()
        self.started = time.time()
        self.last_at: float | None = None

    def add(self, message: ExportTraceServiceRequest, size: int) -> None:
        names: Counter[str] = Counter()
        services: Counter[str] = Counter()
        total = 0
        for resource_spans in message.resource_spans:
            service = "?"
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    service = attribute.value.string_value
                    break
            for scope_spans in resource_spans.scope_spans:
                count = len(scope_spans.spans)
                total += count
                services[service] += count
                for span in scope_spans.spans:
                    names[span.name] += 1
        with self.lock:
            self.spans += total
            self.requests += 1
            self.bytes += size
            self.by_name.update(names)
            self.by_service.update(services)
            self.last_at = time.time()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"spans": self.spans, "export_requests": self.requests,
                    "bytes": self.bytes, "errors": self.errors, "at": time.time(),
                    "started": self.started, "last_export_at": self.last_at,
                    "by_name": dict(self.by_name.most_common()),
                    "by_service": dict(self.by_service.most_common())}


def make_handler(counts: SpanCounts) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/traces":
                self._answer(404, b"", "text/plain")
                return
            try:
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                counts.add(message, length)
            except Exception:
                with counts.lock:
                    counts.errors += 1
                self._answer(400, b"", "text/plain")
                return
            self._answer(200, _EMPTY_RESPONSE, "application/x-protobuf")

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/stats":
                self._answer(200, json.dumps(counts.snapshot()).encode(), "application/json")
            else:
                self._answer(404, b"", "text/plain")

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="count OTLP/HTTP spans, discard them")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    counts = SpanCounts()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(counts))
    server.daemon_threads = True
    print(f"OTLP-SINK-UP {args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
