"""The LLM gateway: OpenAI-compatible chat completions through a prompt cache.

No Ray here. ``ChatGateway`` validates a ``/v1/chat/completions`` body, picks the
upstream that serves its public model name, answers deterministic requests from
the prompt cache (the prediction cache's ``ByteCache``: Redis first, the bounded
in-process LRU+TTL while Redis is away), and otherwise calls the upstream with a
per-upstream concurrency limit and timeout. Every answer is priced from the
configured price table and recorded per tenant in the usage ledger (Redis hashes,
a HyperLogLog of monthly active users); a cache hit records the cost it avoided
instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.errors import InvalidInput, KeelError, ModelNotFound
from deployments.llm.chat import (
    SSE_DONE,
    CacheResult,
    ChatAnswer,
    ChatCall,
    ChatRequest,
    is_deterministic,
    parse_chat,
    replay_stream,
    sse_event,
)
from deployments.llm.config import LLMGatewayConfig, ModelPrice
from deployments.llm.ledger import UsageLedger, token_counts
from deployments.llm.prompt_cache import EntryKind, decode_entry, encode_entry, prompt_key
from deployments.llm.upstream import Upstream
from deployments.storage.remote import RemoteStore
from deployments.storage.tiered import ByteCache


class LLMObserver(Protocol):
    """Told about every request, token, dollar and upstream call (the metrics layer)."""

    def request(self, tenant: str, model: str, cache: CacheResult) -> None:
        """One answered request and where its answer came from."""

    def tokens(self, tenant: str, model: str, prompt: int, completion: int,
               cached: bool) -> None:
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
class _Route:
    upstream: Upstream
    upstream_model: str
    price: ModelPrice


class ChatGateway:
    """Chat completions: validate, route, cache, call the upstream, account (see module)."""

    def __init__(self, remote: RemoteStore | None, config: LLMGatewayConfig | None = None,
                 observer: LLMObserver | None = None) -> None:
        self.config = config or LLMGatewayConfig()
        self.observer = observer
        c = self.config.cache
        self.cache = ByteCache(remote, local_max_entries=c.local_max_entries,
                               retry_after_s=c.retry_after_s, log_interval_s=c.log_interval_s,
                               name="prompt cache",
                               on_failure=self._cache_failed)
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

    async def _lookup(self, key: str, kind: EntryKind) -> tuple[Any, dict[str, Any]] | None:
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
            self._upstream_called(route, model, str(exc.status))
            raise
        self._upstream_called(route, model, "ok")
        return answer

    def _upstream_called(self, route: _Route, model: str, outcome: str) -> None:
        if self.observer is not None:
            self.observer.upstream_call(route.upstream.config.name, model, outcome)

    def _cache_failed(self, operation: str) -> None:
        if self.observer is not None:
            self.observer.cache_failed(operation)

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
            self._upstream_called(route, request.model, str(exc.status))
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
        if observer is not None:
            observer.request(call.tenant, model, result)
            observer.tokens(call.tenant, model, prompt, completion, hit)
            observer.cost(call.tenant, model, spent, avoided)
            if self.hits + self.misses:
                observer.hit_ratio(self.hits / (self.hits + self.misses))
        month = await self.ledger.record(call.tenant, call.user, hit, prompt, completion,
                                         spent, avoided)
        if observer is not None and month is not None and month[1]:
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
