"""``LLMGateway``: the Ray Serve shell around ``ChatGateway`` (metrics, reconfigure)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.errors import parse_user_config
from deployments.llm.chat import CacheResult, ChatAnswer, ChatCall
from deployments.llm.config import LLMGatewayConfig
from deployments.llm.gateway import ChatGateway
from deployments.observability import catalog
from deployments.observability.ray_metrics import make
from deployments.settings import RedisSettings
from deployments.storage.remote import redacted, redis_store_from_env

log = logging.getLogger(__name__)


class LLMMetrics:
    """The gateway's requests, tokens, dollars and upstream calls as Ray Serve metrics
    (an ``LLMObserver``)."""

    def __init__(self) -> None:
        self._requests = make(catalog.LLM_REQUESTS)
        self._tokens = make(catalog.LLM_TOKENS)
        self._cost = make(catalog.LLM_COST)
        self._avoided = make(catalog.LLM_COST_AVOIDED)
        self._calls = make(catalog.LLM_UPSTREAM_CALLS)
        self._errors = make(catalog.LLM_CACHE_ERRORS)
        self._ratio = make(catalog.LLM_CACHE_HIT_RATIO)
        self._per_mau = make(catalog.LLM_COST_PER_MAU)

    def request(self, tenant: str, model: str, cache: CacheResult) -> None:
        self._requests.inc(1, tags={"model": model, "tenant": tenant, "result": cache})

    def tokens(self, tenant: str, model: str, prompt: int, completion: int, cached: bool) -> None:
        source = "cache" if cached else "upstream"
        for kind, count in (("prompt", prompt), ("completion", completion)):
            if count:
                self._tokens.inc(count, tags={"model": model, "tenant": tenant, "kind": kind,
                                              "source": source})

    def cost(self, tenant: str, model: str, spent_usd: float, avoided_usd: float) -> None:
        if spent_usd:
            self._cost.inc(spent_usd, tags={"model": model, "tenant": tenant})
        if avoided_usd:
            self._avoided.inc(avoided_usd, tags={"model": model, "tenant": tenant})

    def upstream_call(self, upstream: str, model: str, outcome: str) -> None:
        self._calls.inc(1, tags={"upstream": upstream, "model": model, "outcome": outcome})

    def hit_ratio(self, ratio: float) -> None:
        self._ratio.set(ratio)

    def cost_per_mau(self, tenant: str, usd: float) -> None:
        self._per_mau.set(usd, tags={"tenant": tenant})

    def cache_failed(self, operation: str) -> None:
        self._errors.inc(1, tags={"operation": operation})


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
class LLMGateway:
    """OpenAI-compatible chat completions to the configured upstreams, through the prompt
    cache in the prediction cache's Redis (``KEEL_REDIS_*``); API keys from the
    environment variable each upstream names (default ``KEEL_LLM_API_KEY``, read by
    ``LLMSettings``)."""

    def __init__(self) -> None:
        settings = RedisSettings()
        self._gateway = ChatGateway(redis_store_from_env(settings), LLMGatewayConfig(),
                                    LLMMetrics())
        log.info("prompt cache: %s", redacted(settings.url) if settings.url else
                 "in-process only (KEEL_REDIS_URL is empty)")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._gateway.reconfigure(parse_user_config(LLMGatewayConfig, user_config,
                                                    "LLMGateway"))

    async def complete(self, call: ChatCall) -> ChatAnswer:
        return await self._gateway.complete(call)

    async def stream(self, call: ChatCall) -> AsyncIterator[str]:
        """Called with ``handle.options(stream=True)``; see ``ChatGateway.stream``."""
        async for item in self._gateway.stream(call):
            yield item

    async def usage(self) -> dict[str, Any]:
        return await self._gateway.usage()
