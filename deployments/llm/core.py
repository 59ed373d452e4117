"""The LLM gateway's core: OpenAI-compatible chat completions through a prompt cache.

No Ray here. ``ChatGateway`` validates a ``/v1/chat/completions`` body, picks the
upstream that serves its public model name, answers deterministic requests from
the prompt cache (the prediction cache's ``ByteCache``: Redis first, the bounded
in-process LRU+TTL while Redis is away), and otherwise calls the upstream with a
per-upstream concurrency limit and timeout. Every answer is priced from the
configured price table and recorded per tenant (Redis hashes, a HyperLogLog of
monthly active users); a cache hit records the cost it avoided instead.

Keys are per tenant and cover the upstream, its model name, the normalised
messages and every other body field except the ones that cannot change the
output (``user``, ``metadata``, ``store``...). Values are JSON, never pickles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.cache.core import ByteCache, HashName, RedisStore, RemoteStore, hasher
from deployments.errors import (
    BadGateway,
    InvalidInput,
    KeelError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    UpstreamTimeout,
    field_errors,
)

log = logging.getLogger(__name__)

CacheResult = Literal["hit", "miss", "bypass"]
#: Header naming the tenant (until API keys carry one); absent: ``anonymous``.
TENANT_HEADER = "x-keel-tenant"
#: Header naming the end user for monthly-active-user counts (else the body's ``user``).
USER_HEADER = "x-keel-user"
ANONYMOUS = "anonymous"
_TENANT_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

#: Body fields that never change what the model answers: left out of the cache key.
#: ``stream``/``stream_options`` are keyed separately (a stream is cached as chunks).
_NOT_KEYED = frozenset({"model", "messages", "stream", "stream_options", "user", "metadata",
                        "store", "service_tier", "parallel_tool_calls_hint"})


# --- configuration ---------------------------------------------------------------------


class ModelPrice(BaseModel):
    """US dollars per 1,000 tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1k: float = Field(default=0.0, ge=0)
    output_per_1k: float = Field(default=0.0, ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1k + completion_tokens * self.output_per_1k) / 1000


class UpstreamConfig(BaseModel):
    """One OpenAI-compatible server (vLLM, OpenAI, a proxy) and the models it serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    #: Up to and including ``/v1``; ``/chat/completions`` is appended.
    base_url: str = Field(pattern=r"^https?://")
    #: Public model name (what clients send) -> the upstream's model name.
    models: dict[str, str] = Field(min_length=1)
    #: Longest wait for a whole answer (non-streaming) or between two chunks (streaming).
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    #: Calls in flight to this upstream at once; more wait up to ``queue_timeout_s``, then 503.
    max_concurrency: int = Field(default=32, ge=1, le=10_000)
    queue_timeout_s: float = Field(default=5.0, ge=0, le=600)
    #: Name of the environment variable holding the API key (never the key itself).
    api_key_env: str = "KEEL_LLM_API_KEY"
    #: Per public model name.
    prices: dict[str, ModelPrice] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _prices_name_models(self) -> UpstreamConfig:
        unknown = sorted(set(self.prices) - set(self.models))
        if unknown:
            raise ValueError(f"prices: {unknown} are not in models {sorted(self.models)}")
        return self


class PromptCacheConfig(BaseModel):
    """Live knobs of the prompt cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    ttl_s: float = Field(default=6 * 3600.0, gt=0, le=30 * 24 * 3600)
    #: Also cache requests that may answer differently each time (temperature > 0, no seed).
    cache_nondeterministic: bool = False
    hash: HashName = "blake3"
    key_prefix: str = Field(default="keel:llm:", max_length=64)
    local_max_entries: int = Field(default=1_000, ge=0, le=1_000_000)
    retry_after_s: float = Field(default=2.0, ge=0, le=600)
    log_interval_s: float = Field(default=30.0, ge=0)


class LLMGatewayConfig(BaseModel):
    """The ``LLMGateway`` deployment's ``user_config``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    cache: PromptCacheConfig = Field(default_factory=PromptCacheConfig)
    #: Characters of message text per request; more is 413.
    max_prompt_chars: int = Field(default=200_000, ge=1, le=100_000_000)
    #: The cost-per-monthly-active-user objective (for the dashboard and /v1/llm/usage).
    target_cost_per_mau_usd: float = Field(default=0.05, ge=0)

    @model_validator(mode="after")
    def _unique_names(self) -> LLMGatewayConfig:
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError(f"upstreams: names must be unique (got {names})")
        seen: dict[str, str] = {}
        for upstream in self.upstreams:
            for model in upstream.models:
                if model in seen:
                    raise ValueError(f"upstreams: model {model!r} is served by both "
                                     f"{seen[model]!r} and {upstream.name!r}")
                seen[model] = upstream.name
        return self


# --- requests --------------------------------------------------------------------------


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


# --- keys and values -------------------------------------------------------------------


def prompt_key(tenant: str, upstream: str, upstream_model: str, request: ChatRequest, *,
               hash_name: HashName = "blake3", prefix: str = "keel:llm:") -> str:
    """The cache key: tenant namespace + a hash over everything that decides the answer.

    Canonical JSON (sorted keys, no whitespace) of the upstream, its model name, the
    messages (with their extra fields, ``None``s dropped) and every other body field
    except those in ``_NOT_KEYED``; streams also key their ``stream_options``.
    """
    params = {k: v for k, v in (request.model_extra or {}).items()
              if k not in _NOT_KEYED and v is not None}
    for name in ("temperature", "seed", "n"):
        value = getattr(request, name)
        if value is not None:
            params[name] = value
    document = {
        "upstream": upstream, "model": upstream_model,
        "messages": [m.model_dump(exclude_none=True) for m in request.messages],
        "params": params, "stream": request.stream,
        "stream_options": request.stream_options if request.stream else None,
    }
    digest = hasher(hash_name)
    digest.update(tenant.encode() + b"\0")
    digest.update(json.dumps(document, sort_keys=True, separators=(",", ":"),
                             ensure_ascii=False).encode())
    return f"{prefix}c:{tenant}:{digest.hexdigest()}"


_ENTRY_MAGIC = b"KLC1"


def encode_entry(kind: Literal["completion", "stream"], payload: Any,
                 usage: dict[str, Any] | None) -> bytes:
    """A cache value: magic + JSON (never a pickle)."""
    return _ENTRY_MAGIC + json.dumps({"kind": kind, "payload": payload, "usage": usage},
                                     separators=(",", ":")).encode()


def decode_entry(data: bytes, kind: Literal["completion", "stream"]) -> tuple[Any, dict[str, Any]]:
    """The payload and usage of a value ``encode_entry`` wrote; ``ValueError`` otherwise."""
    if not data.startswith(_ENTRY_MAGIC):
        raise ValueError("not a Keel prompt cache entry")
    try:
        entry = json.loads(data[len(_ENTRY_MAGIC):])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"damaged prompt cache entry: {exc}") from exc
    if not isinstance(entry, dict) or entry.get("kind") != kind:
        raise ValueError("prompt cache entry of the wrong kind")
    payload, usage = entry.get("payload"), entry.get("usage") or {}
    if kind == "completion" and not isinstance(payload, dict):
        raise ValueError("damaged prompt cache entry")
    if kind == "stream" and not (isinstance(payload, list)
                                 and all(isinstance(c, dict) for c in payload)):
        raise ValueError("damaged prompt cache entry")
    if not isinstance(usage, dict):
        raise ValueError("damaged prompt cache entry usage")
    return payload, usage


def sse_event(chunk: dict[str, Any]) -> str:
    """One server-sent event as OpenAI sends it."""
    return "data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False) + "\n\n"


SSE_DONE = "data: [DONE]\n\n"


def replay_stream(chunks: list[dict[str, Any]]) -> list[str]:
    """A cached stream as the events the original request received."""
    return [sse_event(c) for c in chunks] + [SSE_DONE]


def token_counts(usage: dict[str, Any] | None) -> tuple[int, int]:
    if not usage:
        return 0, 0
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    return (int(prompt), int(completion)) if isinstance(prompt, int | float) and isinstance(
        completion, int | float) else (0, 0)


# --- upstream errors -------------------------------------------------------------------


def upstream_error(upstream: str, status: int, headers: httpx.Headers | dict[str, str],
                   body: bytes) -> KeelError:
    """The Keel error for an upstream's non-2xx answer."""
    detail = _upstream_message(body)
    if status == 429:
        retry = _retry_after(headers.get("retry-after"))
        return RateLimited(f"upstream {upstream!r} is rate limiting: {detail}",
                           retry_after_s=retry)
    if status in (400, 413, 422):
        error = PayloadTooLarge if status == 413 else InvalidInput
        return error(f"upstream {upstream!r} refused the request: {detail}")
    if status >= 500:
        return BadGateway(f"upstream {upstream!r} failed with {status}: {detail}")
    return BadGateway(f"upstream {upstream!r} answered {status}: {detail}")


def transport_error(upstream: str, base_url: str, exc: Exception, timeout_s: float) -> KeelError:
    """The Keel error for a call that got no answer."""
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        return BadGateway(f"upstream {upstream!r} at {base_url} is unreachable "
                          f"({type(exc).__name__})")
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return UpstreamTimeout(f"upstream {upstream!r} did not answer within {timeout_s} s")
    return BadGateway(f"upstream {upstream!r} at {base_url} failed: {type(exc).__name__}")


def _retry_after(value: str | None) -> int:
    try:
        return max(0, int(float(value))) if value is not None else 1
    except ValueError:
        return 1  # an HTTP date: say "soon" rather than parse it


def _upstream_message(body: bytes) -> str:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:200].decode(errors="replace") or "(empty body)"
    if isinstance(document, dict):
        error = document.get("error", document)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        return str(error)[:300]
    return str(document)[:300]


# --- upstream calls --------------------------------------------------------------------


class Upstream:
    """One upstream: its HTTP client (made on first use, in the replica), its semaphore."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.semaphore = asyncio.Semaphore(config.max_concurrency)
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            c = self.config
            headers = {}
            key = os.environ.get(c.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            self._client = httpx.AsyncClient(
                base_url=c.base_url.rstrip("/"), headers=headers,
                timeout=httpx.Timeout(c.timeout_s, connect=c.connect_timeout_s),
                limits=httpx.Limits(max_connections=c.max_concurrency,
                                    max_keepalive_connections=c.max_concurrency))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def acquire(self) -> None:
        """A slot, or 503 with Retry-After once ``queue_timeout_s`` has passed."""
        try:
            await asyncio.wait_for(self.semaphore.acquire(), self.config.queue_timeout_s)
        except TimeoutError as exc:
            raise Overloaded(f"upstream {self.config.name!r} is at its concurrency limit "
                             f"({self.config.max_concurrency}); retry shortly") from exc

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One non-streaming call; the answer's JSON, or the mapped Keel error."""
        c = self.config
        await self.acquire()
        try:
            async with asyncio.timeout(c.timeout_s):
                response = await self.client.post("/chat/completions", json=body)
        except KeelError:
            raise
        except Exception as exc:
            raise transport_error(c.name, c.base_url, exc, c.timeout_s) from exc
        finally:
            self.semaphore.release()
        if response.status_code >= 400:
            raise upstream_error(c.name, response.status_code, response.headers,
                                 response.content)
        try:
            answer = response.json()
        except ValueError as exc:
            raise BadGateway(f"upstream {c.name!r} answered with invalid JSON") from exc
        if not isinstance(answer, dict):
            raise BadGateway(f"upstream {c.name!r} answered with a non-object")
        return answer

    async def stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """A streaming call: raises the mapped error before the first chunk, then yields
        each ``data:`` chunk's JSON until ``[DONE]``."""
        c = self.config
        await self.acquire()
        try:
            request = self.client.build_request("POST", "/chat/completions", json=body)
            try:
                async with asyncio.timeout(c.timeout_s):
                    response = await self.client.send(request, stream=True)
            except Exception as exc:
                raise transport_error(c.name, c.base_url, exc, c.timeout_s) from exc
            try:
                if response.status_code >= 400:
                    content = await response.aread()
                    raise upstream_error(c.name, response.status_code, response.headers,
                                         content)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError as exc:
                        raise BadGateway(f"upstream {c.name!r} sent a malformed event") \
                            from exc
                    if isinstance(chunk, dict):
                        yield chunk
            except KeelError:
                raise
            except Exception as exc:
                raise transport_error(c.name, c.base_url, exc, c.timeout_s) from exc
            finally:
                await response.aclose()
        finally:
            self.semaphore.release()


# --- accounting ------------------------------------------------------------------------


class LLMObserver:
    """Told about every request, token, dollar and upstream call (metrics subclass it)."""

    def request(self, tenant: str, model: str, cache: CacheResult) -> None:
        """One answered request and where its answer came from."""

    def tokens(self, tenant: str, model: str, prompt: int, completion: int, cached: bool) -> None:
        """Tokens of one answer (``cached``: served from the cache, not paid)."""

    def cost(self, tenant: str, model: str, spent_usd: float, avoided_usd: float) -> None:
        """Dollars paid upstream, and dollars a cache hit saved."""

    def upstream_call(self, upstream: str, model: str, outcome: str) -> None:
        """One call to an upstream; ``outcome`` is ``ok`` or the HTTP status Keel answered."""

    def hit_ratio(self, ratio: float) -> None:
        """Share of cacheable requests answered from the cache (this replica)."""

    def cost_per_mau(self, tenant: str, usd: float) -> None:
        """This month's spend over this month's active users, for one tenant."""

    def cache_failed(self, operation: str) -> None:
        """A Redis command of the prompt cache or the ledger failed."""


@dataclass
class TenantUsage:
    """One tenant's month: requests, hits, tokens and dollars."""

    requests: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    avoided_usd: float = 0.0
    users: set[str] = field(default_factory=set)

    def add(self, hit: bool, prompt: int, completion: int, spent: float, avoided: float,
            user: str | None) -> None:
        self.requests += 1
        self.hits += int(hit)
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cost_usd += spent
        self.avoided_usd += avoided
        if user:
            self.users.add(user)


def month_of(now: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime("%Y-%m")


def summarise_usage(fields: dict[str, Any], mau: int, target: float) -> dict[str, Any]:
    """One tenant's ``/v1/llm/usage`` entry from its counters and MAU."""
    def number(name: str) -> float:
        try:
            return float(fields.get(name) or 0)
        except (TypeError, ValueError):
            return 0.0

    cost = number("cost_usd")
    per_mau = cost / mau if mau else None
    requests = int(number("requests"))
    hits = int(number("hits"))
    return {
        "requests": requests, "cache_hits": hits,
        "cache_hit_ratio": hits / requests if requests else None,
        "prompt_tokens": int(number("prompt_tokens")),
        "completion_tokens": int(number("completion_tokens")),
        "cost_usd": round(cost, 6), "cost_avoided_usd": round(number("avoided_usd"), 6),
        "monthly_active_users": mau,
        "cost_per_mau_usd": None if per_mau is None else round(per_mau, 6),
        "cost_per_mau_target_usd": target,
        "within_target": None if per_mau is None else per_mau <= target,
    }


class UsageLedger:
    """Per tenant per month, in Redis: a hash of counters and a HyperLogLog of users.

    ``keel:llm:usage:<tenant>:<YYYY-MM>`` (HINCRBY/HINCRBYFLOAT),
    ``keel:llm:mau:<tenant>:<YYYY-MM>`` (PFADD/PFCOUNT), ``keel:llm:tenants:<YYYY-MM>``
    (a set). While Redis is away the replica keeps its own tallies, which
    ``summary`` reports instead (marked ``"source": "local"``).
    """

    RETENTION_S = 400 * 24 * 3600

    def __init__(self, store: ByteCache, prefix: Callable[[], str],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._prefix = prefix
        self._clock = clock
        self.local: dict[tuple[str, str], TenantUsage] = {}

    def _client(self) -> Any | None:
        remote = self.store.remote
        if isinstance(remote, RedisStore) and self.store.remote_available:
            return remote.client
        return None

    async def record(self, tenant: str, user: str | None, hit: bool, prompt: int,
                     completion: int, spent: float, avoided: float) -> tuple[float, int] | None:
        """Add one request; this month's (cost, MAU) for the tenant when Redis answered."""
        month = month_of(self._clock())
        self.local.setdefault((tenant, month), TenantUsage()).add(hit, prompt, completion,
                                                                  spent, avoided, user)
        client = self._client()
        if client is None:
            return None
        prefix = self._prefix()
        usage_key = f"{prefix}usage:{tenant}:{month}"
        mau_key = f"{prefix}mau:{tenant}:{month}"
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hincrby(usage_key, "requests", 1)
                pipe.hincrby(usage_key, "hits", int(hit))
                pipe.hincrby(usage_key, "prompt_tokens", prompt)
                pipe.hincrby(usage_key, "completion_tokens", completion)
                pipe.hincrbyfloat(usage_key, "cost_usd", spent)
                pipe.hincrbyfloat(usage_key, "avoided_usd", avoided)
                pipe.expire(usage_key, self.RETENTION_S)
                pipe.sadd(f"{prefix}tenants:{month}", tenant)
                pipe.expire(f"{prefix}tenants:{month}", self.RETENTION_S)
                if user:
                    pipe.pfadd(mau_key, user)
                    pipe.expire(mau_key, self.RETENTION_S)
                pipe.pfcount(mau_key)
                results = await pipe.execute()
        except Exception as exc:  # the ledger never fails a request
            self.store.remote_failed("LEDGER", exc)
            return None
        return float(results[4]), int(results[-1])

    async def summary(self, target: float, month: str | None = None) -> dict[str, Any]:
        month = month or month_of(self._clock())
        client = self._client()
        tenants: dict[str, Any] = {}
        if client is not None:
            prefix = self._prefix()
            try:
                names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in
                               await client.smembers(f"{prefix}tenants:{month}"))
                async with client.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.hgetall(f"{prefix}usage:{name}:{month}")
                        pipe.pfcount(f"{prefix}mau:{name}:{month}")
                    results = await pipe.execute()
                for i, name in enumerate(names):
                    raw = {(k.decode() if isinstance(k, bytes) else k): v
                           for k, v in results[2 * i].items()}
                    tenants[name] = summarise_usage(raw, int(results[2 * i + 1]), target)
                return {"month": month, "source": "redis", "tenants": tenants}
            except Exception as exc:
                self.store.remote_failed("LEDGER", exc)
        for (name, m), usage in sorted(self.local.items()):
            if m == month:
                raw = {k: getattr(usage, k) for k in ("requests", "hits", "prompt_tokens",
                                                      "completion_tokens", "cost_usd",
                                                      "avoided_usd")}
                tenants[name] = summarise_usage(raw, len(usage.users), target)
        return {"month": month, "source": "local", "tenants": tenants}


# --- the gateway -----------------------------------------------------------------------


@dataclass
class _Route:
    upstream: Upstream
    upstream_model: str
    price: ModelPrice


class ChatGateway:
    """Chat completions: validate, route, cache, call the upstream, account (see module)."""

    def __init__(self, remote: RemoteStore | None, config: LLMGatewayConfig | None = None,
                 observer: LLMObserver | None = None) -> None:
        self.config = config or LLMGatewayConfig()
        self.observer = observer or LLMObserver()
        c = self.config.cache
        self.cache = ByteCache(remote, local_max_entries=c.local_max_entries,
                               retry_after_s=c.retry_after_s, log_interval_s=c.log_interval_s,
                               name="prompt cache",
                               on_failure=lambda op: self.observer.cache_failed(op))
        self.ledger = UsageLedger(self.cache, lambda: self.config.cache.key_prefix)
        self.upstreams: dict[str, Upstream] = {}
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        #: Cache keys being fetched from an upstream now (single-flight, non-streaming).
        self._inflight: dict[str, asyncio.Future[tuple[dict[str, Any], dict[str, Any]]]] = {}
        self.reconfigure(self.config)

    def reconfigure(self, config: LLMGatewayConfig) -> None:
        """Apply a new config; an upstream whose settings did not change keeps its client."""
        self.config = config
        c = config.cache
        self.cache.reconfigure(local_max_entries=c.local_max_entries,
                               retry_after_s=c.retry_after_s, log_interval_s=c.log_interval_s)
        kept: dict[str, Upstream] = {}
        for upstream_config in config.upstreams:
            old = self.upstreams.get(upstream_config.name)
            kept[upstream_config.name] = (old if old is not None and old.config ==
                                          upstream_config else Upstream(upstream_config))
        retired = [u for name, u in self.upstreams.items() if kept.get(name) is not u]
        self.upstreams = kept
        for upstream in retired:
            # In-flight calls keep their own reference; close once idle (no loop: nothing open).
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(_close_later(upstream))

    def models(self) -> dict[str, str]:
        """Public model name -> upstream name."""
        return {m: u.name for u in self.config.upstreams for m in u.models}

    def _route(self, model: str) -> _Route:
        for upstream in self.upstreams.values():
            target = upstream.config.models.get(model)
            if target is not None:
                return _Route(upstream, target, upstream.config.prices.get(model, ModelPrice()))
        raise ModelNotFound(f"model: {model!r} is not served here "
                            f"(models: {sorted(self.models())})")

    def _prepare(self, call: ChatCall) -> tuple[ChatRequest, _Route, str | None, bool, bool]:
        """The request, its route, its cache key (``None``: not cached), and whether to
        read and to write the cache."""
        request = parse_chat(call.body, self.config.max_prompt_chars)
        route = self._route(request.model)
        c = self.config.cache
        directives = {d.strip().lower() for d in call.cache_control.split(",")}
        cacheable = c.enabled and "no-store" not in directives and (
            c.cache_nondeterministic or is_deterministic(request))
        if not cacheable:
            return request, route, None, False, False
        key = prompt_key(call.tenant, route.upstream.config.name, route.upstream_model,
                         request, hash_name=c.hash, prefix=c.key_prefix)
        return request, route, key, "no-cache" not in directives, True

    def _upstream_body(self, call: ChatCall, route: _Route) -> dict[str, Any]:
        body = dict(call.body)
        body["model"] = route.upstream_model
        return body

    async def _lookup(self, key: str, kind: Literal["completion", "stream"]) -> tuple[
            Any, dict[str, Any]] | None:
        [raw] = await self.cache.get_many([key])
        if raw is None:
            return None
        try:
            return decode_entry(raw, kind)
        except ValueError:
            self.corrupt += 1  # a damaged entry is a miss and gets overwritten
            return None

    async def complete(self, call: ChatCall) -> ChatAnswer:
        """A non-streaming chat completion, from the cache where allowed.

        Concurrent identical cacheable requests call the upstream once: the first claims
        the key before it looks it up, the others wait for its answer (counted as hits).
        """
        request, route, key, read, write = self._prepare(call)
        if request.stream:
            raise InvalidInput("stream: use the streaming call for stream=true")
        owned: asyncio.Future[tuple[dict[str, Any], dict[str, Any]]] | None = None
        if key is not None and read:
            pending = self._inflight.get(key)
            if pending is not None:  # the same prompt is on its way: wait, don't pay twice
                body, usage = await asyncio.shield(pending)
                await self._account(call, request.model, route, "hit", usage)
                return ChatAnswer(body, "hit")
            owned = self._inflight[key] = asyncio.get_running_loop().create_future()
        try:
            found = (await self._lookup(key, "completion")
                     if key is not None and owned is not None else None)
            if found is not None:
                result: CacheResult = "hit"
                answer, usage = found
            else:
                result = "miss" if owned is not None else "bypass"
                answer = await self._call(route, request.model, route.upstream.complete(
                    self._upstream_body(call, route)))
                usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
                if key is not None and write:  # stored before the waiters let go of the key
                    await self.cache.set_many(
                        {key: encode_entry("completion", answer, usage)},
                        self.config.cache.ttl_s)
            if owned is not None:
                owned.set_result((answer, usage))
        except BaseException as exc:
            if owned is not None and not owned.done():
                owned.set_exception(exc)
                owned.exception()  # retrieved: the waiters re-raise it themselves
            raise
        finally:
            if key is not None and owned is not None and self._inflight.get(key) is owned:
                del self._inflight[key]
        await self._account(call, request.model, route, result, usage)
        return ChatAnswer(answer, result)

    async def _call(self, route: _Route, model: str, pending: Any) -> Any:
        try:
            answer = await pending
        except KeelError as exc:
            self.observer.upstream_call(route.upstream.config.name, model, str(exc.status))
            raise
        self.observer.upstream_call(route.upstream.config.name, model, "ok")
        return answer

    async def stream(self, call: ChatCall) -> AsyncIterator[str]:
        """A streaming chat completion as server-sent events.

        The first item is the cache result (``hit``, ``miss`` or ``bypass``), yielded
        only once the upstream accepted the call, so that every error before it becomes
        an HTTP status; then each event (``data: {...}\\n\\n``) and ``data: [DONE]``. A
        failure mid-stream ends it with an ``error`` event and is not cached.
        """
        request, route, key, read, write = self._prepare(call)
        if not request.stream:
            raise InvalidInput("stream: the streaming call needs stream=true")
        if key is not None and read:
            found = await self._lookup(key, "stream")
            if found is not None:
                cached_chunks, cached_usage = found
                await self._account(call, request.model, route, "hit", cached_usage)
                yield "hit"
                for event in replay_stream(cached_chunks):
                    yield event
                return
        client_wants_usage = bool((request.stream_options or {}).get("include_usage"))
        body = self._upstream_body(call, route)
        # Ask for usage always: the ledger needs the token counts.
        body["stream_options"] = {**(request.stream_options or {}), "include_usage": True}
        upstream = route.upstream.stream(body)
        result: CacheResult = "miss" if key is not None and read else "bypass"
        chunks: list[dict[str, Any]] = []
        usage: dict[str, Any] = {}
        try:
            first = await self._call(route, request.model, upstream.__anext__())
        except StopAsyncIteration:
            first = None
        yield result
        try:
            pending = first
            while pending is not None:
                if isinstance(pending.get("usage"), dict):
                    usage = pending["usage"]
                usage_only = not pending.get("choices") and "usage" in pending
                if client_wants_usage or not usage_only:
                    chunks.append(pending)
                    yield sse_event(pending)
                try:
                    pending = await upstream.__anext__()
                except StopAsyncIteration:
                    pending = None
        except KeelError as exc:
            self.observer.upstream_call(route.upstream.config.name, request.model,
                                        str(exc.status))
            yield sse_event({"error": {"message": exc.message, "type": "upstream_error",
                                       "code": exc.status}})
            yield SSE_DONE
            await self._account(call, request.model, route, result, usage)
            return
        finally:
            await upstream.aclose()
        yield SSE_DONE
        if key is not None and write:
            await self.cache.set_many({key: encode_entry("stream", chunks, usage)},
                                      self.config.cache.ttl_s)
        await self._account(call, request.model, route, result, usage)

    async def _account(self, call: ChatCall, model: str, route: _Route, result: CacheResult,
                       usage: dict[str, Any]) -> None:
        prompt, completion = token_counts(usage)
        price = route.price.cost(prompt, completion)
        hit = result == "hit"
        spent, avoided = (0.0, price) if hit else (price, 0.0)
        if result == "hit":
            self.hits += 1
        elif result == "miss":
            self.misses += 1
        observer = self.observer
        observer.request(call.tenant, model, result)
        observer.tokens(call.tenant, model, prompt, completion, hit)
        observer.cost(call.tenant, model, spent, avoided)
        if self.hits + self.misses:
            observer.hit_ratio(self.hits / (self.hits + self.misses))
        month = await self.ledger.record(call.tenant, call.user, hit, prompt, completion,
                                         spent, avoided)
        if month is not None and month[1]:
            observer.cost_per_mau(call.tenant, month[0] / month[1])

    async def usage(self) -> dict[str, Any]:
        """``GET /v1/llm/usage``: this month per tenant, plus this replica's cache state."""
        summary = await self.ledger.summary(self.config.target_cost_per_mau_usd)
        summary["cache"] = {
            "enabled": self.config.cache.enabled,
            "remote": "up" if self.cache.remote_available else
                      ("none" if self.cache.remote is None else "down"),
            "replica_hits": self.hits, "replica_misses": self.misses,
            "replica_hit_ratio": (self.hits / (self.hits + self.misses)
                                  if self.hits + self.misses else None),
            "corrupt": self.corrupt, "errors": self.cache.errors,
        }
        summary["models"] = self.models()
        return summary

    async def aclose(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.aclose()


async def _close_later(upstream: Upstream, grace_s: float = 600.0) -> None:
    await asyncio.sleep(grace_s)
    await upstream.aclose()
