"""``Ingress``: the Ray Serve shell around the FastAPI app (handles, reconfigure)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge

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
        result: ModelStatus = await _call(f"model {name!r}", self._handle(name).status.remote())
        return result

    async def infer(self, name: str, call: InferCall) -> InferResult:
        result: InferResult = await _call(f"model {name!r}",
                                          self._handle(name).infer.remote(call))
        return result


class HandleFeatures:
    """Calls the ``FeatureService`` deployment; maps Ray's errors to Keel's."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def lookup(self, entities: list[dict[str, Any]], features: list[str]) -> FeatureRows:
        rows: FeatureRows = await _call("the feature store",
                                        self._handle.lookup.remote(entities, features))
        return rows


async def _call(what: str, response: Awaitable[Any]) -> Any:
    """Await a handle call; a Ray error becomes the Keel error the client should see."""
    try:
        return await response
    except TimeoutError:
        raise
    except Exception as exc:
        raise _as_keel_error(what, exc) from exc


def _as_keel_error(what: str, exc: Exception) -> KeelError:
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
    """The prediction cache's counts as Ray Serve metrics (Prometheus via Ray)."""

    def __init__(self, cache: PredictionCache) -> None:
        self._cache = cache
        self._rows = Counter("keel_cache_rows_total",
                             description="Rows looked up in the prediction cache, by result "
                                         "(hit, miss, shared).",
                             # Ray's stub says tuple[str]; any number of keys works.
                             tag_keys=("model", "result"))  # type: ignore[arg-type]
        self._errors = Counter("keel_cache_errors_total",
                               description="Redis commands of the prediction cache that failed "
                                           "(the in-process fallback answered).",
                               tag_keys=("operation",))
        self._ratio = Gauge("keel_cache_hit_ratio",
                            description="Share of rows answered without the model, since start.",
                            tag_keys=("model",))

    def rows(self, model: str, hits: int, misses: int, shared: int) -> None:
        for result, count in (("hit", hits), ("miss", misses), ("shared", shared)):
            if count:
                self._rows.inc(count, tags={"model": model, "result": result})
        ratio = self._cache.counters.hit_ratio(model)
        if ratio is not None:
            self._ratio.set(ratio, tags={"model": model})

    def remote_failed(self, operation: str) -> None:
        self._errors.inc(1, tags={"operation": operation})


def build_cache(config: CacheConfig) -> PredictionCache:
    """The prediction cache over the Redis named by the environment (``KEEL_REDIS_*``)."""
    settings = RedisSettings()
    cache = PredictionCache(redis_store_from_env(settings), config)
    cache.observer = CacheMetrics(cache)
    log.info("prediction cache: %s", redacted(settings.url) if settings.url else
             "in-process only (KEEL_REDIS_URL is empty)")
    return cache


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    """The HTTP entry point: Open Inference Protocol and ``/v1/decide`` over the handles,
    with the prediction cache in front of the models."""

    def __init__(self, models: dict[str, DeploymentHandle],
                 features: DeploymentHandle | None = None) -> None:
        self._backend = HandleBackend(models)
        self._features = HandleFeatures(features) if features is not None else None
        self._config = IngressConfig()
        self._cache = build_cache(self._config.cache)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._config = parse_user_config(IngressConfig, user_config, "Ingress")
        self._cache.reconfigure(self._config.cache)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._backend, lambda: self._config, cache=self._cache,
                          features=self._features)
