"""The ``LLMGateway`` deployment's ``user_config``: upstreams, their prices, the prompt cache.

Validated by pydantic and applied live by ``ChatGateway.reconfigure``; secrets are never
here (an upstream names the environment variable that holds its key).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.storage.hashing import HashName


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
