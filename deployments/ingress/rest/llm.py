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
from deployments.ingress.rest.http import MODEL_SCOPE_KEY, read_body
from deployments.llm.chat import USER_HEADER, ChatAnswer, ChatCall, tenant_of


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
    # RecursionError: nesting past the decoder's depth is malformed input, not a 500.
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
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


#: The chat route's body (ChatRequest, which the ingress adds to the document's components)
#: and the headers it reads.
_CHAT_DOCUMENT: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatRequest"}}}},
    "parameters": [
        {"name": "X-Keel-Tenant", "in": "header", "required": False,
         "description": "The tenant billed (1-64 of A-Z a-z 0-9 _ . -; overridden by an "
                        "API key's tenant)",
         "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,64}$"}},
        {"name": "X-Keel-User", "in": "header", "required": False,
         "description": "The end user, for monthly active users", "schema": {"type": "string"}},
    ],
}


def _error(description: str) -> dict[str, Any]:
    """A documented error answer: Keel's ``{"error": ...}`` body (ErrorBody)."""
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}


def add_llm_routes(app: FastAPI, llm: LLMBackend | None,
                   max_body_bytes: Callable[[], int]) -> None:
    """Register the routes on ``app`` (503 for each when ``llm`` is ``None``)."""

    def backend() -> LLMBackend:
        if llm is None:
            raise DependencyUnavailable("no LLM gateway is configured (AppArgs llm: false)")
        return llm

    @app.post("/v1/chat/completions",
              summary="OpenAI-compatible chat completions through the prompt cache",
              responses={400: _error("Bad request; the message names the field"),
                         404: _error("Unknown model"),
                         413: _error("Body over max_body_bytes, or prompt over "
                                     "max_prompt_chars"),
                         415: _error("Content-Type other than application/json, or a "
                                     "Content-Encoding"),
                         429: _error("Upstream rate limit (Retry-After passed on)"),
                         502: _error("Upstream failed or unreachable"),
                         503: _error("Upstream at its concurrency limit, or no gateway"),
                         504: _error("Upstream timed out")},
              # The body is read by hand within max_body_bytes; document what it must be.
              openapi_extra=_CHAT_DOCUMENT)
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
                                      "hits, tokens, cost, cost avoided, MAU, cost per MAU",
             responses={503: _error("No LLM gateway, or it does not answer")})
    async def llm_usage() -> dict[str, Any]:
        return await backend().usage()
