"""``FleetModel``: the Ray Serve shell around a fleet directory (``serve.multiplexed``)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from ray import serve

from deployments.contracts import InferCall, InferResult, ModelStatus
from deployments.errors import InvalidInput, KeelError, parse_user_config
from deployments.fleet.core import (
    CachingRepository,
    FleetConfig,
    FleetLedger,
    FleetMember,
    fleet_status,
)
from deployments.observability import catalog, tracing
from deployments.observability.ray_metrics import make
from deployments.observability.replica import observe_replica, replica_user_config

log = logging.getLogger(__name__)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class FleetModel:
    """Every model of one fleet directory, loaded on demand, at most
    ``max_models_per_replica`` per replica (least recently used unloaded first).

    The ingress sends each batch of one member's requests as one handle call with
    ``multiplexed_model_id`` set to the member's name: Ray Serve routes it to a replica
    that holds the model when there is one, else to the replica holding the fewest.
    """

    def __init__(self, fleet: str, directory: str, max_models_per_replica: int) -> None:
        observe_replica(fleet)
        self._fleet = fleet
        self._repository = CachingRepository(directory)
        self._config = parse_user_config(FleetConfig, replica_user_config(), fleet)
        self._ledger = FleetLedger()
        self._loads_metric = make(catalog.MODEL_LOADS)
        self._batch_metric = make(catalog.MODEL_BATCH_SIZE)
        self._max_models = max_models_per_replica

        # A function of this replica's own (Ray keeps the LRU on the decorated object).
        async def load(model_id: str) -> FleetMember:
            return await asyncio.to_thread(self._load, model_id)

        self._member = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load)

    def _load(self, name: str) -> FleetMember:
        started = time.perf_counter()
        try:
            member = FleetMember(self._repository, name, self._config.runtime,
                                 on_unload=self._ledger.unloaded)
        except KeelError:
            self._ledger.load_failed(name)
            raise
        self._ledger.loaded(name, (time.perf_counter() - started) * 1000)
        self._loads_metric.inc(1, tags={"model": name, "version": member.version})
        return member

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._config = parse_user_config(FleetConfig, user_config, self._fleet)
        log.info("fleet %s: runtime %s (loaded members reload on their next call)",
                 self._fleet, self._config.runtime.model_dump())

    async def infer_many(self, calls: list[InferCall]) -> list[InferResult | KeelError]:
        """One member's batch (the call's ``multiplexed_model_id`` names it)."""
        if not calls:
            return []  # the ingress's warm-up: no model named, none loaded
        name = serve.get_multiplexed_model_id()
        if not name:
            raise InvalidInput(f"a call to fleet {self._fleet!r} names no model "
                               f"(multiplexed_model_id)")
        member = await self._member(name)
        runtime = self._config.runtime
        if member.needs_refresh(calls, runtime):
            await asyncio.to_thread(member.refresh, runtime)
        with tracing.span("keel.model.batch",
                          {"keel.model": name, "keel.fleet": self._fleet,
                           "keel.batch.size": len(calls)},
                          links=tracing.links([c.trace for c in calls])):
            answers = member.infer_batch(calls)
        self._ledger.answered(name, len(calls))
        self._batch_metric.observe(len(calls), tags={"model": name})
        return answers

    async def infer_aside(self, calls: list[InferCall]) -> list[InferResult | KeelError]:
        # Fleet members have no shadow versions; the ModelBackend protocol asks for it.
        return await self.infer_many(calls)

    async def status(self, name: str) -> ModelStatus:
        """A member's status from the repository (never loads it)."""
        return await asyncio.to_thread(fleet_status, self._repository, self._fleet, name)

    async def stats(self) -> dict[str, Any]:
        """This replica's loads, unloads, calls and rows per member (tests, the bench)."""
        context = serve.get_replica_context()
        return {"pid": os.getpid(), "replica": context.replica_id.unique_id,
                "max_models_per_replica": self._max_models, **self._ledger.snapshot()}
