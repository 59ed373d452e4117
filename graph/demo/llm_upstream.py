"""A small OpenAI-compatible chat completions server in a thread: the LLM gateway's upstream
for the demo (``keel demo-llm``: the tour's LLM calls work with no vLLM), the tests and the
LLM cache benchmark. It echoes; it is no model.

It speaks the real wire format: JSON answers with ``usage``, and for ``stream: true``
server-sent events ``data: {...}`` with ``choices[].delta``, a final usage chunk when
``stream_options.include_usage`` is set, and ``data: [DONE]``. It counts calls. The last
user message steers it: ``!status 429`` / ``!status 500`` answer that status,
``!hang`` never answers (until the server stops); anything else is echoed back.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog (5) drops connects under load: 1 s stalls


@dataclass
class UpstreamCall:
    body: dict[str, Any]
    authorization: str | None


@dataclass
class FakeUpstream:
    """``start()`` then use ``url`` (ends in ``/v1``); ``calls`` records every request."""

    delay_s: float = 0.0
    host: str = "127.0.0.1"
    port: int = 0
    retry_after: str = "7"
    calls: list[UpstreamCall] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://{self.host}:{self._server.server_address[1]}/v1"

    def chat_calls(self) -> int:
        with self._lock:
            return len(self.calls)

    def start(self) -> FakeUpstream:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as separate writes: without this, Nagle's algorithm
            # and delayed ACKs add 40 ms to every answer.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with upstream._lock:
                    upstream.calls.append(UpstreamCall(body, self.headers.get("authorization")))
                upstream.answer(self, body)

        self._server = _Server((self.host, self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- answers ---------------------------------------------------------------------

    def answer(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        prompt = "".join(str(m.get("content") or "") for m in body.get("messages", []))
        last = str((body.get("messages") or [{}])[-1].get("content") or "")
        if last.startswith("!hang"):
            self._stop.wait(600)
            return
        if last.startswith("!status "):
            status = int(last.split()[1])
            payload = json.dumps({"error": {"message": f"fake upstream says {status}",
                                            "type": "test"}}).encode()
            handler.send_response(status)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(payload)))
            if status == 429:
                handler.send_header("retry-after", self.retry_after)
            handler.end_headers()
            handler.wfile.write(payload)
            return
        if self.delay_s:
            time.sleep(self.delay_s)
        words = f"echo from {body.get('model')}: {last}".split(" ")
        usage = {"prompt_tokens": max(1, len(prompt) // 4), "completion_tokens": len(words),
                 "total_tokens": max(1, len(prompt) // 4) + len(words)}
        created = int(time.time())
        ident = f"chatcmpl-{len(self.calls)}"
        if not body.get("stream"):
            payload = json.dumps({
                "id": ident, "object": "chat.completion", "created": created,
                "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": " ".join(words)}}],
                "usage": usage}).encode()
            handler.send_response(200)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def send(data: str) -> None:
            raw = f"data: {data}\n\n".encode()
            handler.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            handler.wfile.flush()

        base = {"id": ident, "object": "chat.completion.chunk", "created": created,
                "model": body.get("model")}
        pieces = [{"role": "assistant", "content": ""}] + [
            {"content": w if i == 0 else " " + w} for i, w in enumerate(words)]
        for i, delta in enumerate(pieces):
            finish = "stop" if i == len(pieces) - 1 else None
            send(json.dumps({**base, "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": finish}]}))
        if include_usage:
            send(json.dumps({**base, "choices": [], "usage": usage}))
        send("[DONE]")
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
