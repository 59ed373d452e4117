"""The ingress's Ray Serve metrics and SLO events: ``IngressMetrics`` (the ingress's
``ServingObserver``), ``CacheMetrics`` (the prediction cache's observer) and
``SloPusher`` (this process's SLO events to the ``SloMonitor``, about once a second).

Metric names and tags are declared in ``catalog.py``; ``ray_metrics.make`` builds them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import get_args

import numpy as np
from ray.serve.handle import DeploymentHandle

from deployments.cache.core import PredictionCache
from deployments.contracts import CacheStatus
from deployments.observability import catalog
from deployments.observability.ray_metrics import make
from deployments.observability.slo import SloObserver, SloReport, process_recorder

log = logging.getLogger(__name__)


class CacheMetrics:
    """The prediction cache's counts as Ray Serve metrics and SLO events."""

    def __init__(self, cache: PredictionCache, slo: SloObserver) -> None:
        self._cache = cache
        self._slo = slo
        self._rows = make(catalog.CACHE_ROWS)
        self._errors = make(catalog.CACHE_ERRORS)
        self._ratio = make(catalog.CACHE_HIT_RATIO)
        self._lookup = make(catalog.CACHE_LOOKUP)
        self._write = make(catalog.CACHE_WRITE)
        self._local_entries = make(catalog.CACHE_LOCAL_ENTRIES)
        self._evictions = make(catalog.CACHE_LOCAL_EVICTIONS)

    def rows(self, model: str, hits: int, misses: int, shared: int, lookup_ms: float,
             version: str = "") -> None:
        for result, count in zip(get_args(CacheStatus), (hits, misses, shared), strict=True):
            if count:
                self._rows.inc(count, tags={"model": model, "version": version,
                                            "result": result})
        self._lookup.observe(lookup_ms, tags={"model": model})
        ratio = self._cache.counters.hit_ratio(model)
        if ratio is not None:
            self._ratio.set(ratio, tags={"model": model})
        self._slo.cache_rows(model, hits, misses, shared)

    def stored(self, model: str, write_ms: float, local_entries: int, evictions: int) -> None:
        self._write.observe(write_ms, tags={"model": model})
        self._local_entries.set(local_entries)
        if evictions:
            self._evictions.inc(evictions)

    def remote_failed(self, operation: str) -> None:
        self._errors.inc(1, tags={"operation": operation})


class IngressMetrics(SloObserver):
    """Requests and model calls as Ray Serve metrics, and as SLO events.

    SLO events are recorded only when a pusher drains them to the SloMonitor (else they
    would pile up in the process), and nothing at all while ``metrics`` is off.
    """

    def __init__(self, pusher: SloPusher | None, enabled: Callable[[], bool]) -> None:
        super().__init__()
        self._pusher = pusher
        self._enabled = enabled
        self._slo_events = pusher is not None
        self._requests = make(catalog.REQUESTS)
        self._latency = make(catalog.REQUEST_LATENCY)
        self._model_latency = make(catalog.MODEL_LATENCY)
        self._batch = make(catalog.MODEL_BATCH_SIZE)
        self._feature_age = make(catalog.FEATURE_AGE)
        self._shadow_compared = make(catalog.SHADOW_COMPARED)
        self._shadow_flips = make(catalog.SHADOW_FLIPS)
        self._shadow_difference = make(catalog.SHADOW_DIFFERENCE)
        self._shadow_dropped = make(catalog.SHADOW_DROPPED)
        self._payloads_logged = make(catalog.PAYLOADS_LOGGED)
        self._payloads_dropped = make(catalog.PAYLOADS_DROPPED)
        self._feature_drift = make(catalog.FEATURE_DRIFT)

    def request(self, http_route: str, model: str, status: int, latency_ms: float,
                version: str = "") -> None:
        if not self._enabled():
            return
        if self._slo_events:
            super().request(http_route, model, status, latency_ms)
        self._requests.inc(1, tags={"http_route": http_route, "model": model,
                                    "version": version, "status": str(status)})
        self._latency.observe(latency_ms, tags={"http_route": http_route, "model": model,
                                                "version": version})
        if self._pusher is not None:
            self._pusher.ensure_running()

    def model_call(self, model: str, latency_ms: float, ok: bool) -> None:
        if not self._enabled():
            return
        if self._slo_events:
            super().model_call(model, latency_ms, ok)
        self._model_latency.observe(latency_ms, tags={"model": model})

    def cache_rows(self, model: str, hits: int, misses: int, shared: int) -> None:
        if self._enabled() and self._slo_events:
            super().cache_rows(model, hits, misses, shared)

    def model_batch(self, model: str, size: int) -> None:
        """A coalesced call's size (for ingress-placed models, the ONNX Runtime batch)."""
        if self._enabled():
            self._batch.observe(size, tags={"model": model})

    def shadow_compared(self, model: str, version: str, shadow_version: str,
                        differences: np.ndarray, flips: int) -> None:
        """A shadow copy compared (after the answer, off the request path)."""
        if not self._enabled():
            return
        tags = {"model": model, "version": version, "shadow_version": shadow_version}
        self._shadow_compared.inc(len(differences), tags=tags)
        if flips:
            self._shadow_flips.inc(flips, tags=tags)
        for difference in differences.tolist():
            self._shadow_difference.observe(difference, tags=tags)

    def shadow_dropped(self, model: str, version: str, shadow_version: str,
                       reason: str) -> None:
        if self._enabled():
            self._shadow_dropped.inc(1, tags={"model": model, "version": version,
                                              "shadow_version": shadow_version,
                                              "reason": reason})

    def payloads_logged(self, count: int) -> None:
        if self._enabled():
            self._payloads_logged.inc(count)

    def payloads_dropped(self, reason: str, count: int) -> None:
        if self._enabled():
            self._payloads_dropped.inc(count, tags={"reason": reason})

    def feature_drift(self, model: str, version: str, feature: str, value: float) -> None:
        if self._enabled():
            self._feature_drift.set(value, tags={"model": model, "version": version,
                                                 "feature": feature})

    def feature_ages(self, ages: dict[str, float]) -> None:
        """How old (event time) the feature rows a decision used were, per feature view."""
        if self._enabled():
            for view, age in ages.items():
                self._feature_age.set(age, tags={"feature_view": view})


class SloPusher:
    """Sends this process's SLO events to the ``SloMonitor`` about once a second.

    A delta that cannot be delivered is put back and sent with the next one, so a
    monitor restart loses nothing younger than the recorder keeps.
    """

    def __init__(self, monitor: DeploymentHandle, interval_s: Callable[[], float]) -> None:
        self._monitor = monitor
        self._interval_s = interval_s
        self._recorder = process_recorder()
        self._source = f"{socket.gethostname()}:{os.getpid()}"
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failures = 0

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def flush(self) -> None:
        async with self._lock:
            delta = self._recorder.drain()
            if not delta:
                return
            try:
                await asyncio.wait_for(self._monitor.push.remote(delta, self._source), 5)
            except Exception as exc:
                self._recorder.restore(delta)
                self._failures += 1
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    log.warning("SLO push failed (%d so far): %r", self._failures, exc)

    async def warm_up(self) -> None:
        """One empty push: sets up the handle's path to the monitor."""
        await asyncio.wait_for(self._monitor.push.remote({}, self._source), 10)

    async def report(self) -> SloReport:
        await self.flush()  # this replica's latest events count too
        report: SloReport = await self._monitor.report.remote()
        return report

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s())
            await self.flush()
