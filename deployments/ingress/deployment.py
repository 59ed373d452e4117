"""``Ingress``: the Ray Serve shell around the FastAPI app (handles, reconfigure)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from fastapi import FastAPI
from opentelemetry.trace import SpanKind
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.cache.core import (
    CacheConfig,
    CacheObserver,
    PredictionCache,
    redacted,
    redis_store_from_env,
)
from deployments.contracts import InferCall, InferResult, ModelStatus
from deployments.errors import (
    DependencyUnavailable,
    KeelError,
    ModelNotFound,
    Overloaded,
    parse_user_config,
)
from deployments.features.core import FeatureRows
from deployments.ingress.app import IngressConfig, create_app
from deployments.ingress.auth import announce, load_auth
from deployments.llm.core import ChatAnswer, ChatCall
from deployments.observability import catalog, tracing
from deployments.observability.asgi import RequestSpans
from deployments.observability.ray_metrics import make
from deployments.observability.replica import observe_replica
from deployments.observability.slo import SloObserver, SloReport, process_recorder
from deployments.settings import RedisSettings

log = logging.getLogger(__name__)


class HandleBackend:
    """Calls ``OnnxModel`` deployments through their handles; maps Ray's errors to Keel's."""

    def __init__(self, models: dict[str, DeploymentHandle]) -> None:
        self._models = models
        self._names = sorted(models)

    def model_names(self) -> list[str]:
        return self._names

    def _handle(self, name: str) -> DeploymentHandle:
        handle = self._models.get(name)
        if handle is None:
            raise ModelNotFound(f"model {name!r} is not served here (models: {self._names})")
        return handle

    async def status(self, name: str) -> ModelStatus:
        result: ModelStatus = await _call(f"model {name!r}", self._handle(name).status.remote(),
                                          "model")
        return result

    async def infer(self, name: str, call: InferCall) -> InferResult:
        # Ray Serve carries the span's context to the replica; call.trace lets the batch
        # span there link this request too (see deployments/observability/tracing.py).
        with tracing.span("keel.model.call", {"keel.model": name}, kind=SpanKind.CLIENT):
            call.trace = tracing.carrier()
            result: InferResult = await _call(f"model {name!r}",
                                              self._handle(name).infer.remote(call), "model")
        return result


class HandleFeatures:
    """Calls the ``FeatureService`` deployment; maps Ray's errors to Keel's."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def warm_up(self) -> None:
        await _call("the feature store", self._handle.stats.remote(), "features")

    async def lookup(self, entities: list[dict[str, Any]], features: list[str]) -> FeatureRows:
        with tracing.span("keel.features.lookup",
                          {"keel.entities": len(entities), "keel.features": len(features)},
                          kind=SpanKind.CLIENT):
            rows: FeatureRows = await _call("the feature store", self._handle.lookup.remote(
                entities, features, trace=tracing.carrier()), "features")
        return rows


class HandleLLM:
    """Calls the ``LLMGateway`` deployment (streams through a streaming handle)."""

    WHAT = "the LLM gateway"

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._streaming = handle.options(stream=True)

    async def complete(self, call: ChatCall) -> ChatAnswer:
        answer: ChatAnswer = await _call(self.WHAT, self._handle.complete.remote(call), "llm")
        return answer

    async def stream(self, call: ChatCall) -> AsyncIterator[str]:
        try:
            events = cast(DeploymentResponseGenerator, self._streaming.stream.remote(call))
            async for item in events:
                yield item
        except Exception as exc:
            raise _as_keel_error(self.WHAT, exc, "llm") from exc

    async def usage(self) -> dict[str, Any]:
        summary: dict[str, Any] = await _call(self.WHAT, self._handle.usage.remote(), "llm")
        return summary


async def _call(what: str, response: Any, stage: str) -> Any:
    """Await a handle call; a Ray error becomes the Keel error the client should see.

    If the awaiting task is cancelled (the request's time budget ran out, or the client
    went away), the call is cancelled too: a request still queued for a batch leaves
    it, one running has its own downstream calls cancelled by Serve. Nothing keeps
    working for an answer no one will read. ``response`` is a ``DeploymentResponse``
    (Ray types ``.remote()`` as a union with the streaming generator).
    """
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
    except TimeoutError:
        raise
    except Exception as exc:
        raise _as_keel_error(what, exc, stage) from exc


def _as_keel_error(what: str, exc: Exception, stage: str) -> KeelError:
    """The Keel error for a failed handle call; server-side failures name ``stage``."""
    error = _keel_error_of(what, exc)
    return error.at(stage) if error.status >= 500 else error


def _keel_error_of(what: str, exc: Exception) -> KeelError:
    if isinstance(exc, KeelError) and not isinstance(exc, RayTaskError):
        return exc
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, KeelError):
            return cause
        log.error("%s failed: %s", what, exc)
        return DependencyUnavailable(f"{what} failed: {type(cause).__name__}")
    if isinstance(exc, BackPressureError):
        return Overloaded(f"{what} is overloaded; retry shortly")
    if isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError
                  | DeploymentUnavailableError | ReplicaUnavailableError):
        return DependencyUnavailable(f"{what} is unavailable: {type(exc).__name__}",
                                     retry_after_s=1)
    log.error("%s call failed: %r", what, exc)
    return DependencyUnavailable(f"{what} call failed: {type(exc).__name__}")


class CacheMetrics(CacheObserver):
    """The prediction cache's counts as Ray Serve metrics and SLO events."""

    def __init__(self, cache: PredictionCache, slo: SloObserver) -> None:
        self._cache = cache
        self._slo = slo
        self._rows = make(catalog.CACHE_ROWS)
        self._errors = make(catalog.CACHE_ERRORS)
        self._ratio = make(catalog.CACHE_HIT_RATIO)

    def rows(self, model: str, hits: int, misses: int, shared: int) -> None:
        for result, count in (("hit", hits), ("miss", misses), ("shared", shared)):
            if count:
                self._rows.inc(count, tags={"model": model, "result": result})
        ratio = self._cache.counters.hit_ratio(model)
        if ratio is not None:
            self._ratio.set(ratio, tags={"model": model})
        self._slo.cache_rows(model, hits, misses, shared)

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

    def request(self, http_route: str, model: str, status: int, latency_ms: float) -> None:
        if not self._enabled():
            return
        if self._slo_events:
            super().request(http_route, model, status, latency_ms)
        self._requests.inc(1, tags={"http_route": http_route, "model": model,
                                    "status": str(status)})
        self._latency.observe(latency_ms, tags={"http_route": http_route, "model": model})
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


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    """The HTTP entry point: Open Inference Protocol and ``/v1/decide`` over the handles,
    with the prediction cache in front of the models."""

    def __init__(self, models: dict[str, DeploymentHandle],
                 features: DeploymentHandle | None = None,
                 slo_monitor: DeploymentHandle | None = None,
                 llm: DeploymentHandle | None = None) -> None:
        observe_replica()  # span attributes, Pyroscope (after the replica started)
        self._auth = load_auth()  # KEEL_AUTH, KEEL_API_KEYS(_FILE); malformed: no start
        announce(self._auth)
        self._backend = HandleBackend(models)
        self._features = HandleFeatures(features) if features is not None else None
        self._config = IngressConfig()
        self._pusher = (SloPusher(slo_monitor, lambda: self._config.slo_push_interval_s)
                        if slo_monitor is not None else None)
        self._metrics = IngressMetrics(self._pusher, lambda: self._config.metrics)
        self._cache = build_cache(self._config.cache, self._metrics)
        self._warming: asyncio.Task[None] | None = None
        # Serve builds replicas inside their event loop: warm the handles there, in the
        # background (no loop: the first requests pay for it instead).
        with contextlib.suppress(RuntimeError):
            self._warming = asyncio.get_running_loop().create_task(self._warm_handles())
        self._llm = HandleLLM(llm) if llm is not None else None

    async def _warm_handles(self) -> None:
        """Call every downstream deployment once: a handle's first call sets up its router
        (measured in the demo: the first /v1/decide spent 4 s in its feature hop)."""
        started = time.perf_counter()
        calls: list[Awaitable[Any]] = [self._backend.status(name)
                                       for name in self._backend.model_names()]
        if self._features is not None:
            calls.append(self._features.warm_up())
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        log.info("downstream handles warmed up in %.2f s (%d of %d answered)",
                 time.perf_counter() - started, len(results) - len(failed), len(results))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._config = parse_user_config(IngressConfig, user_config, "Ingress")
        self._cache.reconfigure(self._config.cache)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self._backend, lambda: self._config, cache=self._cache,
                         features=self._features, observer=self._metrics, slo=self._pusher,
                         llm=self._llm, auth=self._auth)
        app.add_middleware(RequestSpans)  # keel.request spans; a no-op when tracing is off
        return app
