"""The prediction cache's live knobs (``CacheConfig``) and its cost policy
(``CacheCosts``: does a lookup cost less than computing the rows, per model)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.storage.hashing import HashName

CachePolicy = Literal["auto", "always", "never"]


class CacheConfig(BaseModel):
    """Live knobs of the prediction cache (part of the ingress's ``user_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    #: How long an answer stays cached. Answers are keyed by model version, so a TTL only
    #: bounds memory and how long a retired version's answers linger.
    ttl_s: float = Field(default=600.0, gt=0, le=30 * 24 * 3600)
    hash: HashName = "blake3"
    key_prefix: str = Field(default="keel:pred:", max_length=64)
    #: The in-process fallback's bound (entries) while Redis is unreachable.
    local_max_entries: int = Field(default=10_000, ge=0, le=10_000_000)
    #: After a Redis failure, how long to serve from the fallback before trying again.
    retry_after_s: float = Field(default=2.0, ge=0, le=600)
    #: At most one "Redis unreachable" log line per this interval.
    log_interval_s: float = Field(default=30.0, ge=0)
    #: When a model's rows go through the cache: ``auto`` only while a lookup is measured
    #: to cost less than computing them (a model cheaper than a Redis round trip skips
    #: it), ``always``, or ``never``. ``models`` sets it per model.
    policy: CachePolicy = "auto"
    models: dict[str, CachePolicy] = Field(default_factory=dict)
    #: Under ``auto``, how often a skipping model sends one request through the cache
    #: anyway, to measure the lookup again.
    probe_interval_s: float = Field(default=10.0, gt=0, le=3600)

    def policy_of(self, model: str) -> CachePolicy:
        return self.models.get(model, self.policy)


class CacheCosts:
    """Per model, what a cache lookup and a computation cost (exponential moving averages
    of milliseconds per request), and whether the cache pays for that model now."""

    ALPHA = 0.1

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.lookup_ms: dict[str, float] = {}
        self.compute_ms: dict[str, float] = {}
        self._last_probe: dict[str, float] = {}

    def _update(self, table: dict[str, float], model: str, ms: float) -> None:
        old = table.get(model)
        table[model] = ms if old is None else old + self.ALPHA * (ms - old)

    def lookup(self, model: str, ms: float) -> None:
        self._update(self.lookup_ms, model, ms)

    def compute(self, model: str, ms: float) -> None:
        self._update(self.compute_ms, model, ms)

    def use_cache(self, model: str, policy: CachePolicy, probe_interval_s: float) -> bool:
        """``always``/``never`` as said; ``auto``: while either cost is unknown, while a
        lookup is cheaper than the computation, and once per ``probe_interval_s``."""
        if policy != "auto":
            return policy == "always"
        lookup, compute = self.lookup_ms.get(model), self.compute_ms.get(model)
        if lookup is None or compute is None or lookup < compute:
            return True
        now = self._clock()
        if now - self._last_probe.get(model, float("-inf")) >= probe_interval_s:
            self._last_probe[model] = now
            return True
        return False

    def snapshot(self, model: str, policy: CachePolicy, probe_interval_s: float
                 ) -> dict[str, Any]:
        lookup, compute = self.lookup_ms.get(model), self.compute_ms.get(model)
        pays = None if lookup is None or compute is None else lookup < compute
        return {"policy": policy, "lookup_ms": _rounded(lookup), "compute_ms": _rounded(compute),
                "in_use": policy == "always" or (policy == "auto" and pays is not False)}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
