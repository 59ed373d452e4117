"""``SloMonitor``: one replica that merges every ingress replica's SLO events.

Ingress replicas push their :class:`~deployments.observability.slo.Recorder`
deltas here (``push``) about once a second; ``report`` evaluates every objective
over every window for the whole application, and a background loop exports the
result as gauges (``keel_slo_*``). Run exactly one replica: the figures are the
merge of what reaches it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from deployments.errors import parse_user_config
from deployments.observability import catalog
from deployments.observability.ray_metrics import make
from deployments.observability.replica import observe_replica
from deployments.observability.slo import Delta, SloBook, SloConfig, SloReport

log = logging.getLogger(__name__)


@serve.deployment(num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0.1})
class SloMonitor:
    """The application's SLO book (see module docstring)."""

    def __init__(self) -> None:
        observe_replica()  # span attributes, Pyroscope (after the replica started)
        self._book = SloBook()
        self._gauges = {spec.name: make(spec) for spec in (
            catalog.SLO_VALUE, catalog.SLO_TARGET, catalog.SLO_COMPLIANT, catalog.SLO_BUDGET,
            catalog.SLO_EVENTS)}
        self._exporter: asyncio.Task[None] | None = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._book.config = parse_user_config(SloConfig, user_config, "SloMonitor")

    async def push(self, delta: Delta, source: str) -> None:
        """Merge one replica's events (``source`` names the replica)."""
        self._book.add(delta, source)
        if self._exporter is None or self._exporter.done():
            self._exporter = asyncio.get_running_loop().create_task(self._export_loop())

    async def report(self) -> SloReport:
        return self._book.report()

    async def _export_loop(self) -> None:
        while True:
            try:
                self._export(self._book.report())
            except Exception:  # gauges are best effort; the next round tries again
                log.exception("SLO gauge export failed")
            await asyncio.sleep(self._book.config.evaluate_interval_s)

    def _export(self, report: SloReport) -> None:
        for objective in report.objectives:
            self._gauges[catalog.SLO_TARGET.name].set(objective.target,
                                                      tags={"slo": objective.name})
            for window, result in objective.windows.items():
                tags = {"slo": objective.name, "window": window}
                self._gauges[catalog.SLO_EVENTS.name].set(result.events, tags=tags)
                if result.value is None:
                    continue  # no events: leave the last value rather than invent one
                self._gauges[catalog.SLO_VALUE.name].set(result.value, tags=tags)
                self._gauges[catalog.SLO_COMPLIANT.name].set(1 if result.compliant else 0,
                                                             tags=tags)
                if result.budget_remaining is not None:
                    self._gauges[catalog.SLO_BUDGET.name].set(result.budget_remaining,
                                                              tags=tags)
