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
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.background import AfterAnswer
from deployments.cache.core import PredictionCache
from deployments.cache.policy import CacheConfig
from deployments.errors import parse_user_config
from deployments.ingress.auth import announce, load_auth
from deployments.ingress.dataplane.config import IngressConfig
from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.grpc.servicer import GrpcOip
from deployments.ingress.pool.handles import (
    FleetHandles,
    HandleFeatures,
    HandleLLM,
    HandleModels,
)
from deployments.ingress.pool.placement import EmbeddedModels, ModelPool
from deployments.ingress.rest.app import build_plane, create_rest_app
from deployments.observability.ingress_metrics import CacheMetrics, IngressMetrics, SloPusher
from deployments.observability.replica import (
    observe_replica,
    replica_max_ongoing_requests,
    replica_user_config,
)
from deployments.observability.slo import SloObserver
from deployments.repository import ModelRepository
from deployments.settings import RedisSettings
from deployments.storage.remote import RedisStore, redacted, redis_store_from_env

log = logging.getLogger(__name__)


class IngressArgs(BaseModel):
    """The Ingress's start-up arguments besides its handles (``graph/app.py`` builds them
    from the application's ``AppArgs``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The model repository's root (the models placed in the ingress load from it).
    repository: str | None = None
    #: The models placed in the ingress (``args.placement``: ``ingress``).
    embedded: list[str] = Field(default_factory=list)
    #: Each fleet's directory, by fleet name (the keys of the ``fleets`` handles).
    fleet_directories: dict[str, str] = Field(default_factory=dict)


def build_redis() -> RedisStore | None:
    """The process's Redis, as the environment names it (``KEEL_REDIS_*``): the
    prediction cache's and the payload log's; ``None`` when ``KEEL_REDIS_URL`` is empty."""
    settings = RedisSettings()
    log.info("Redis: %s", redacted(settings.url) if settings.url else
             "none (KEEL_REDIS_URL is empty): the prediction cache is in-process only")
    return redis_store_from_env(settings)


def build_cache(config: CacheConfig, slo: SloObserver, redis: RedisStore | None,
                after_answer: AfterAnswer) -> PredictionCache:
    """The prediction cache over ``redis``, writing back through ``after_answer``."""
    cache = PredictionCache(redis, config, background=after_answer)
    cache.observer = CacheMetrics(cache, slo)
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

    def __init__(self, *, args: dict[str, Any],
                 models: dict[str, DeploymentHandle],
                 fleets: dict[str, DeploymentHandle] | None = None,
                 features: DeploymentHandle | None = None,
                 slo_monitor: DeploymentHandle | None = None,
                 llm: DeploymentHandle | None = None) -> None:
        """Bound by keyword (``graph/app.py``): ``args`` is an ``IngressArgs``'s data,
        the others are the handles of the deployments this one calls."""
        parsed = IngressArgs.model_validate(args)
        observe_replica()  # span attributes, Pyroscope (after the replica started)
        self._auth = load_auth()  # KEEL_AUTH, KEEL_API_KEYS(_FILE); malformed: no start
        announce(self._auth)
        # Load the ingress-placed models on the versions user_config pins before the first
        # request (reconfigure() then finds them loaded), as an OnnxModel replica does.
        self._config = parse_user_config(IngressConfig, replica_user_config(), "Ingress")
        self._embedded = (EmbeddedModels(ModelRepository(parsed.repository), parsed.embedded)
                          if parsed.embedded and parsed.repository else None)
        if self._embedded is not None:
            self._embedded.apply(self._config.models)
        self._pusher = (SloPusher(slo_monitor, lambda: self._config.slo_push_interval_s)
                        if slo_monitor is not None else None)
        self._metrics = IngressMetrics(self._pusher, lambda: self._config.metrics)
        # One Redis and one after-the-answer queue for the whole replica.
        self._redis = build_redis()
        self._after_answer = AfterAnswer()
        self._cache = build_cache(self._config.cache, self._metrics, self._redis,
                                  self._after_answer)
        self._features = HandleFeatures(features) if features is not None else None
        self._handles = HandleModels(models, self._retry_after_s) if models else None
        self._fleets = [FleetHandles(name, handle, parsed.fleet_directories[name],
                                     self._retry_after_s)
                        for name, handle in sorted((fleets or {}).items())]
        pool = ModelPool(self._embedded, self._handles, fleets=self._fleets,
                         max_batch_size=self._max_batch_size,
                         max_in_flight=lambda: self._config.calls_in_flight,
                         observer=self._metrics)
        self._plane: DataPlane = build_plane(pool, lambda: self._config, cache=self._cache,
                                             features=self._features, observer=self._metrics,
                                             slo=self._pusher, warm_up=self._warm_up,
                                             redis=self._redis,
                                             after_answer=self._after_answer)
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
        # Only the in-ingress models' statuses follow this config. Dropping every model's
        # made the next requests to a deployment-placed model all wait for one status call
        # and then leave together, a burst of handle calls at once.
        if self._embedded is not None:
            self._plane.catalog.forget(self._embedded.model_names())
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
