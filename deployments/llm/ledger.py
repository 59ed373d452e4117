"""The usage ledger: per tenant per month, requests, cache hits, tokens, dollars spent and
avoided, and monthly active users (in Redis, through the prompt cache's ``ByteCache``;
the replica's own tallies while Redis is away)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from deployments.storage.remote import RedisCommand
from deployments.storage.tiered import ByteCache


def token_counts(usage: dict[str, Any] | None) -> tuple[int, int]:
    """Prompt and completion tokens of an OpenAI ``usage`` object (0, 0 if it has none)."""
    if not usage:
        return 0, 0
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    return (int(prompt), int(completion)) if isinstance(prompt, int | float) and isinstance(
        completion, int | float) else (0, 0)


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

    async def record(self, tenant: str, user: str | None, hit: bool, prompt: int,
                     completion: int, spent: float, avoided: float) -> tuple[float, int] | None:
        """Add one request; this month's (cost, MAU) for the tenant when Redis answered.

        A Redis failure never fails the request: it is counted as ``LEDGER``, and the
        replica's own tallies stand in.
        """
        month = month_of(self._clock())
        self.local.setdefault((tenant, month), TenantUsage()).add(hit, prompt, completion,
                                                                  spent, avoided, user)
        prefix = self._prefix()
        usage_key = f"{prefix}usage:{tenant}:{month}"
        mau_key = f"{prefix}mau:{tenant}:{month}"
        tenants_key = f"{prefix}tenants:{month}"
        commands: list[RedisCommand] = [
            ("HINCRBY", usage_key, "requests", 1),
            ("HINCRBY", usage_key, "hits", int(hit)),
            ("HINCRBY", usage_key, "prompt_tokens", prompt),
            ("HINCRBY", usage_key, "completion_tokens", completion),
            ("HINCRBYFLOAT", usage_key, "cost_usd", spent),
            ("HINCRBYFLOAT", usage_key, "avoided_usd", avoided),
            ("EXPIRE", usage_key, self.RETENTION_S),
            ("SADD", tenants_key, tenant),
            ("EXPIRE", tenants_key, self.RETENTION_S),
        ]
        if user:
            commands += [("PFADD", mau_key, user), ("EXPIRE", mau_key, self.RETENTION_S)]
        commands.append(("PFCOUNT", mau_key))
        results = await self.store.execute_remote(commands, "LEDGER")
        if results is None:
            return None
        return float(results[4]), int(results[-1])

    async def summary(self, target: float, month: str | None = None) -> dict[str, Any]:
        """This month per tenant: from Redis (all replicas), else this replica's tallies."""
        month = month or month_of(self._clock())
        tenants: dict[str, Any] = {}
        prefix = self._prefix()
        members = await self.store.execute_remote([("SMEMBERS", f"{prefix}tenants:{month}")],
                                                  "LEDGER")
        if members is not None:
            names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members[0])
            commands: list[RedisCommand] = []
            for name in names:
                commands += [("HGETALL", f"{prefix}usage:{name}:{month}"),
                             ("PFCOUNT", f"{prefix}mau:{name}:{month}")]
            results = await self.store.execute_remote(commands, "LEDGER")
            if results is not None:
                for i, name in enumerate(names):
                    raw = {(k.decode() if isinstance(k, bytes) else k): v
                           for k, v in results[2 * i].items()}
                    tenants[name] = summarise_usage(raw, int(results[2 * i + 1]), target)
                return {"month": month, "source": "redis", "tenants": tenants}
        for (name, m), usage in sorted(self.local.items()):
            if m == month:
                raw = {k: getattr(usage, k) for k in ("requests", "hits", "prompt_tokens",
                                                      "completion_tokens", "cost_usd",
                                                      "avoided_usd")}
                tenants[name] = summarise_usage(raw, len(usage.users), target)
        return {"month": month, "source": "local", "tenants": tenants}

