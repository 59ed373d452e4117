"""The admin views over the data plane: cache state, rollouts, the SLO report.
No transport, no Ray."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.background import AfterAnswer
from deployments.cache.core import PredictionCache
from deployments.contracts import ModelStatus
from deployments.errors import DependencyUnavailable
from deployments.features.rowcache import FeatureRowCache
from deployments.ingress.dataplane.catalog import ModelCatalog, describe
from deployments.ingress.dataplane.config import IngressConfig
from deployments.ingress.pool.placement import ModelPool
from deployments.ingress.rollout.shadow import ShadowMirror
from deployments.observability.slo import SloReport


class SloSource(Protocol):
    """Where ``GET /v1/slo`` gets the application-wide SLO figures."""

    async def report(self) -> SloReport: ...


@dataclass
class AdminViews:
    """``/v1/cache``, ``/v1/rollouts`` and ``/v1/slo``: what this replica holds and sees."""

    config: Callable[[], IngressConfig]
    models: ModelPool
    catalog: ModelCatalog
    cache: PredictionCache | None
    after_answer: AfterAnswer
    feature_rows: FeatureRowCache
    shadow: ShadowMirror
    slo: SloSource | None

    def cache_state(self) -> dict[str, Any]:
        cache = self.cache
        rows = self.feature_rows
        feature_rows = {"max_staleness_s": rows.config.max_staleness_s, "entries": len(rows),
                        "hits": rows.hits, "misses": rows.misses}
        if cache is None:
            return {"enabled": False, "remote": None, "feature_rows": feature_rows}
        counters = cache.counters
        config = cache.config
        models = sorted(set(counters.hits) | set(counters.misses) | set(counters.shared)
                        | set(self.models.model_names()))
        return {
            "enabled": config.enabled,
            "remote": "up" if cache.remote_available else
                      ("none" if cache.remote is None else "down"),
            "config": config.model_dump(),
            "errors": counters.errors,
            "corrupt": counters.corrupt,
            "local_entries": len(cache.local),
            "writes": self.after_answer.counts(),
            "models": {m: {"hits": counters.hits.get(m, 0), "misses": counters.misses.get(m, 0),
                           "shared": counters.shared.get(m, 0),
                           "hit_ratio": counters.hit_ratio(m),
                           **cache.costs.snapshot(m, config.policy_of(m),
                                                  config.probe_interval_s)}
                       for m in models},
            "feature_rows": feature_rows,
        }

    async def rollouts(self) -> dict[str, Any]:
        """``/v1/rollouts``: each model's versions, traffic split and shadow, and how the
        shadow's answers compared with the live ones in this replica so far (fleet members
        serve their latest version: not listed one by one)."""
        names = [n for n in self.models.model_names() if self.models.fleet(n) is None]
        statuses = await asyncio.gather(*(self.catalog.status(n) for n in names),
                                        return_exceptions=True)
        models: dict[str, Any] = {}
        for name, status in zip(names, statuses, strict=True):
            if not isinstance(status, ModelStatus):
                models[name] = {"error": describe(status)}
                continue
            weights = status.traffic or ({status.served_version: 1.0}
                                         if status.served_version else {})
            total = sum(weights.values())
            models[name] = {
                "served_version": status.served_version,
                "loaded_versions": sorted(status.loaded),
                "traffic": status.traffic,
                "shares": {v: w / total for v, w in weights.items()} if total else {},
                "shadow": status.shadow.model_dump() if status.shadow else None,
                "comparisons": self.shadow.state(name),
            }
        return {"models": models,
                "shadow_queue": {"waiting": self.shadow.waiting,
                                 "capacity": self.config().shadow_queue}}

    async def slo_report(self) -> SloReport:
        if self.slo is None:
            raise DependencyUnavailable("no SLO monitor is configured")
        try:
            return await asyncio.wait_for(self.slo.report(), self.config().ready_timeout_s)
        except TimeoutError as exc:
            raise DependencyUnavailable("the SLO monitor did not answer", retry_after_s=1) \
                from exc
