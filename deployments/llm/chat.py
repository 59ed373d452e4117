"""A chat completion as it crosses Keel: the OpenAI request body, the call, the answer.

``parse_chat`` validates a ``/v1/chat/completions`` body (400 names the field, 413 an
oversized prompt); ``ChatCall`` and ``ChatAnswer`` carry it from the ingress to the
gateway and back; ``sse_event`` writes a streamed chunk as OpenAI sends it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.errors import InvalidInput, PayloadTooLarge, field_errors

#: Where an answer came from: the prompt cache, the upstream after a lookup, or the
#: upstream without one (not cacheable, or ``Cache-Control`` said so).
CacheResult = Literal["hit", "miss", "bypass"]
#: Header naming the tenant (until API keys carry one); absent: ``anonymous``.
TENANT_HEADER = "x-keel-tenant"
#: Header naming the end user for monthly-active-user counts (else the body's ``user``).
USER_HEADER = "x-keel-user"
ANONYMOUS = "anonymous"
_TENANT_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ChatMessage(BaseModel):
    """One message; unknown fields pass through to the upstream."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        extra = self.model_extra or {}
        if self.role == "assistant" and (extra.get("tool_calls") or extra.get("function_call")):
            return self
        if self.content is None or self.content == "" or self.content == []:
            raise ValueError(f"content: must not be empty for role {self.role!r}")
        return self


class ChatRequest(BaseModel):
    """The fields Keel reads; every other field passes through (and is keyed)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=128)


@dataclass
class ChatCall:
    """One chat completion request as it crosses from the ingress to the gateway."""

    body: dict[str, Any]
    tenant: str = ANONYMOUS
    #: For monthly active users; ``None``: the request counts no user.
    user: str | None = None
    #: The request's ``Cache-Control`` header (``no-cache``: skip the lookup, store the
    #: fresh answer; ``no-store``: do neither).
    cache_control: str = ""


@dataclass
class ChatAnswer:
    """A non-streaming answer: the OpenAI response body and where it came from."""

    body: dict[str, Any]
    cache: CacheResult


def tenant_of(header: str | None) -> str:
    """The tenant named by ``X-Keel-Tenant`` (``anonymous`` when absent); 400 if malformed."""
    if header is None or header == "":
        return ANONYMOUS
    if not _TENANT_RE.match(header):
        raise InvalidInput("X-Keel-Tenant: 1-64 characters of A-Z a-z 0-9 _ . -")
    return header


def parse_chat(body: dict[str, Any], max_prompt_chars: int) -> ChatRequest:
    """Validate a chat completion body; 400 names the field, 413 an oversized prompt."""
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object")
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidInput("; ".join(field_errors(exc, limit=5))) from exc
    chars = prompt_chars(request.messages)
    if chars > max_prompt_chars:
        raise PayloadTooLarge(f"messages: the prompt is {chars} characters; the limit is "
                              f"{max_prompt_chars}")
    return request


def prompt_chars(messages: list[ChatMessage]) -> int:
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content:
            total += sum(len(str(part.get("text", ""))) for part in message.content)
    return total


def is_deterministic(request: ChatRequest) -> bool:
    """Temperature 0 or a fixed seed: the same request is expected to answer the same."""
    return request.temperature == 0 or request.seed is not None

def sse_event(chunk: dict[str, Any]) -> str:
    """One server-sent event as OpenAI sends it."""
    return "data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False) + "\n\n"


SSE_DONE = "data: [DONE]\n\n"


def replay_stream(chunks: list[dict[str, Any]]) -> list[str]:
    """A cached stream as the events the original request received."""
    return [sse_event(c) for c in chunks] + [SSE_DONE]

