"""``Ingress``: the Ray Serve shell around the ingress's data plane: wiring only.

It builds the data plane (deployments/ingress/dataplane/plane.py) over the models placed
in the ingress (``args.placement``) and the handles of the others, the prediction
cache, the FeatureService handle and the SLO pusher; ``reconfigure`` applies the
live knobs; ``__serve_build_asgi_app__`` hands Serve the REST application, and the
methods named after the gRPC protocol's (``ModelInfer``...) hand Serve's gRPC calls to
``GrpcOip`` (deployments/ingress/grpc/servicer.py), over the same data plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, get_args

import numpy as np
from fastapi import FastAPI
from google.protobuf.message import Message
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.cache.core import (
    CacheConfig,
    PredictionCache,
    redacted,
    redis_store_from_env,
)
from deployments.contracts import CacheStatus
from deployments.errors import parse_user_config
from deployments.ingress.auth import announce, load_auth
from deployments.ingress.dataplane.plane import DataPlane, IngressConfig
from deployments.ingress.grpc.servicer import GrpcOip
from deployments.ingress.pool.handles import (
    FleetHandles,
    HandleFeatures,
    HandleLLM,
    HandleModels,
)
from deployments.ingress.pool.placement import EmbeddedModels, ModelPool
from deployments.ingress.rest.app import build_plane, create_rest_app
from deployments.observability import catalog
from deployments.observability.ray_metrics import make
from deployments.observability.replica import (
    observe_replica,
    replica_max_ongoing_requests,
    replica_user_config,
)
from deployments.observability.slo import SloObserver, SloReport, process_recorder
from deployments.repository import ModelRepository
from deployments.settings import RedisSettings

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


def build_cache(config: CacheConfig, slo: SloObserver) -> PredictionCache:
    """The prediction cache over the Redis named by the environment (``KEEL_REDIS_*``)."""
    settings = RedisSettings()
    cache = PredictionCache(redis_store_from_env(settings), config)
    cache.observer = CacheMetrics(cache, slo)
    log.info("prediction cache: %s", redacted(settings.url) if settings.url else
             "in-process only (KEEL_REDIS_URL is empty)")
    return cache


def _grpc_method(name: str) -> Callable[[Ingress, Any, Any], Awaitable[Message]]:
    """The Ingress's method for one gRPC method of the protocol (Ray Serve passes the
    call's context as ``grpc_context`` to a method that names it)."""

    async def method(self: Ingress, request: Any, grpc_context: Any) -> Message:
        return await self._grpc.call(name, request, grpc_context)

    method.__name__ = method.__qualname__ = name
    return method


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    """The HTTP entry point: Open Inference Protocol, ``/v1/decide``, the LLM gateway and
    the admin routes, over the data plane; models placed here run in this replica."""

    def __init__(self, models: dict[str, DeploymentHandle],
                 features: DeploymentHandle | None = None,
                 slo_monitor: DeploymentHandle | None = None,
                 llm: DeploymentHandle | None = None,
                 embedded: list[str] | None = None,
                 repository: str | None = None,
                 fleets: dict[str, DeploymentHandle] | None = None,
                 fleet_directories: dict[str, str] | None = None) -> None:
        observe_replica()  # span attributes, Pyroscope (after the replica started)
        self._auth = load_auth()  # KEEL_AUTH, KEEL_API_KEYS(_FILE); malformed: no start
        announce(self._auth)
        # Load the ingress-placed models on the versions user_config pins before the first
        # request (reconfigure() then finds them loaded), as an OnnxModel replica does.
        self._config = parse_user_config(IngressConfig, replica_user_config(), "Ingress")
        self._embedded = (EmbeddedModels(ModelRepository(repository), embedded)
                          if embedded and repository else None)
        if self._embedded is not None:
            self._embedded.apply(self._config.models)
        self._pusher = (SloPusher(slo_monitor, lambda: self._config.slo_push_interval_s)
                        if slo_monitor is not None else None)
        self._metrics = IngressMetrics(self._pusher, lambda: self._config.metrics)
        self._cache = build_cache(self._config.cache, self._metrics)
        self._features = HandleFeatures(features) if features is not None else None
        self._handles = HandleModels(models, self._retry_after_s) if models else None
        self._fleets = [FleetHandles(name, handle, (fleet_directories or {})[name],
                                     self._retry_after_s)
                        for name, handle in sorted((fleets or {}).items())]
        pool = ModelPool(self._embedded, self._handles, fleets=self._fleets,
                         max_batch_size=self._max_batch_size,
                         max_in_flight=lambda: self._config.calls_in_flight,
                         observer=self._metrics)
        self._plane: DataPlane = build_plane(pool, lambda: self._config, cache=self._cache,
                                             features=self._features, observer=self._metrics,
                                             slo=self._pusher, warm_up=self._warm_up)
        self._llm = HandleLLM(llm) if llm is not None else None
        self._grpc = GrpcOip(self._plane, lambda: self._auth, self._metrics)
        # Serve builds replicas inside their event loop: warm every hop there, in the
        # background; /v2/health/ready answers 503 until it is done.
        with contextlib.suppress(RuntimeError):
            self._plane.start_warming()

    def _retry_after_s(self) -> float | None:
        return self._config.model_call_retry_s

    def _max_batch_size(self, model: str) -> int:
        if self._embedded is not None and model in self._embedded.model_names():
            return self._embedded.config(model).max_batch_size
        return self._config.max_batch_size

    async def _warm_up(self) -> None:
        """Call every downstream deployment through the methods requests use: a handle's
        first call sets up its router (measured in the demo: the first /v1/decide spent
        seconds in its feature hop)."""
        started = time.perf_counter()
        calls: list[Awaitable[Any]] = []
        if self._handles is not None:
            calls += [self._handles.status(name) for name in self._handles.model_names()]
            calls += [self._handles.infer_many(name, []) for name in self._handles.model_names()]
        calls += [fleet.warm_up() for fleet in self._fleets]
        if self._features is not None:
            calls.append(self._features.warm_up())
        if self._pusher is not None:
            calls.append(self._pusher.warm_up())
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for failure in failed:
            log.warning("warm-up call failed: %r", failure)
        log.info("downstream hops warmed up in %.2f s (%d of %d answered)",
                 time.perf_counter() - started, len(results) - len(failed), len(results))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = parse_user_config(IngressConfig, user_config, "Ingress")
        if self._embedded is not None:
            changed = self._embedded.apply(config.models)
            if changed:
                log.info("ingress models reloaded: %s", changed)
        elif config.models:
            log.warning("user_config.models %s ignored: no model is placed in the ingress",
                        sorted(config.models))
        ongoing = replica_max_ongoing_requests()
        if ongoing is not None and ongoing <= config.max_requests:
            log.warning("max_ongoing_requests (%d) is not above user_config.max_requests (%d): "
                        "Ray turns overload away first, in plain text", ongoing,
                        config.max_requests)
        self._config = config
        self._plane.catalog.forget()
        self._plane.reconfigured()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_rest_app(self._plane, observer=self._metrics, llm=self._llm,
                               auth=self._auth)

    # The Open Inference Protocol over gRPC (inference.GRPCInferenceService, registered by
    # grpc_options in serve_config.yaml): Ray Serve calls the method of each call's name.
    ServerLive = _grpc_method("ServerLive")
    ServerReady = _grpc_method("ServerReady")
    ServerMetadata = _grpc_method("ServerMetadata")
    ModelReady = _grpc_method("ModelReady")
    ModelMetadata = _grpc_method("ModelMetadata")
    ModelInfer = _grpc_method("ModelInfer")
