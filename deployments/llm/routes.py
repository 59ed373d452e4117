"""The ingress's LLM routes: ``POST /v1/chat/completions`` and ``GET /v1/llm/usage``.

No Ray here. The ingress reads the body within its size limit and hands it to an
``LLMBackend`` (the ``LLMGateway`` deployment's handle in production, a
``ChatGateway`` in process in tests). Streams are answered as server-sent events
once the gateway has said where the answer comes from, so that every error before
the first event is a proper HTTP status.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments.errors import DependencyUnavailable, InvalidInput
from deployments.ingress.auth import authorize, key_of
from deployments.llm.core import USER_HEADER, ChatAnswer, ChatCall, tenant_of

#: Where the request metrics find a route's model (the ingress's MODEL_SCOPE_KEY).
MODEL_SCOPE_KEY = "keel.model"


class LLMBackend(Protocol):
    """What the routes need of the LLM gateway."""

    async def complete(self, call: ChatCall) -> ChatAnswer: ...

    def stream(self, call: ChatCall) -> AsyncIterator[str]: ...

    async def usage(self) -> dict[str, Any]: ...


def chat_call(request: Request, body: bytes) -> ChatCall:
    """The gateway call for a request: parsed body, tenant, user, cache directives.

    With auth on, the key must have access to the body's model, and a key's tenant
    overrides ``X-Keel-Tenant`` (a client cannot bill another tenant)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"body: not valid JSON ({exc})") from exc
    if not isinstance(payload, dict):
        raise InvalidInput("body: expected a JSON object")
    key = key_of(request.scope)
    authorize(key, str(payload.get("model", "")))
    tenant = key.tenant if key is not None and key.tenant else \
        tenant_of(request.headers.get("x-keel-tenant"))
    user = request.headers.get(USER_HEADER) or payload.get("user")
    return ChatCall(body=payload, tenant=tenant,
                    user=str(user)[:256] if user else None,
                    cache_control=request.headers.get("cache-control", ""))


def add_llm_routes(app: FastAPI, llm: LLMBackend | None, max_body_bytes: Callable[[], int],
                   read_body: Any) -> None:
    """Register the routes on ``app`` (503 for each when ``llm`` is ``None``)."""

    def backend() -> LLMBackend:
        if llm is None:
            raise DependencyUnavailable("no LLM gateway is configured (AppArgs llm: false)")
        return llm

    @app.post("/v1/chat/completions",
              summary="OpenAI-compatible chat completions through the prompt cache",
              responses={400: {"description": "Bad request; the message names the field"},
                         404: {"description": "Unknown model"},
                         413: {"description": "Prompt over max_prompt_chars"},
                         429: {"description": "Upstream rate limit (Retry-After passed on)"},
                         502: {"description": "Upstream failed or unreachable"},
                         503: {"description": "Upstream at its concurrency limit"},
                         504: {"description": "Upstream timed out"}})
    async def chat_completions(request: Request) -> Response:
        gateway = backend()
        call = chat_call(request, await read_body(request, max_body_bytes()))
        request.scope[MODEL_SCOPE_KEY] = str(call.body.get("model", ""))
        if call.body.get("stream") is True:
            events = gateway.stream(call)
            try:
                cache = await anext(events)  # raises the call's error as an HTTP status
            except StopAsyncIteration as exc:
                raise DependencyUnavailable("the LLM gateway ended the stream early") from exc
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"X-Keel-Cache": cache,
                                              "Cache-Control": "no-cache"})
        answer = await gateway.complete(call)
        return JSONResponse(answer.body, headers={"X-Keel-Cache": answer.cache})

    @app.get("/v1/llm/usage", summary="LLM usage this month per tenant: requests, cache "
                                      "hits, tokens, cost, cost avoided, MAU, cost per MAU")
    async def llm_usage() -> dict[str, Any]:
        return await backend().usage()
