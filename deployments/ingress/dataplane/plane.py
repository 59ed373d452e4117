"""The ingress's data plane: what every API does, with no transport and no Ray.

``DataPlane`` is what the transports (``rest/``, ``grpc/``) hold: it wires the APIs over
one model pool, one catalog of model status, one prediction cache and one after-the-
answer queue, and answers readiness and metadata itself. Bodies come in as bytes and
answers go out as bytes or plain data; only ``KeelError`` is raised. The APIs:

- ``inference`` (inference.py): Open Inference Protocol infer, the cache where it pays;
- ``decisions`` (decide.py): ``/v1/decide``, features for entities then inference;
- ``admin`` (admin.py): cache state, rollouts, the SLO report;
- ``catalog`` (catalog.py): each model's status, shared by all of them.

Behind them: ``ModelPool`` (``pool/``): each model in the ingress or in its own
deployment, concurrent calls coalesced; ``Predictor`` (predictor.py); the rollout
features (``rollout/``). Work the client does not wait for (cache writes, shadow copies,
payload records) goes through one ``AfterAnswer`` (``deployments/background.py``);
everything observed goes to one ``ServingObserver``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from deployments.background import AfterAnswer
from deployments.cache.core import PredictionCache
from deployments.contracts import ModelStatus
from deployments.errors import KeelError, ModelNotFound, Overloaded, quoted
from deployments.features.rowcache import FeatureRowCache
from deployments.ingress.dataplane import codec
from deployments.ingress.dataplane.admin import AdminViews, SloSource
from deployments.ingress.dataplane.catalog import ModelCatalog, describe
from deployments.ingress.dataplane.config import SERVER_NAME, IngressConfig, server_version
from deployments.ingress.dataplane.decide import Decisions, FeatureBackend
from deployments.ingress.dataplane.inference import Inference
from deployments.ingress.dataplane.predictor import Predictor
from deployments.ingress.pool.placement import ModelPool
from deployments.ingress.rollout.drift import DriftMonitor
from deployments.ingress.rollout.payload_log import PayloadLog
from deployments.ingress.rollout.shadow import ShadowMirror
from deployments.observability.events import ServingObserver
from deployments.storage.remote import RemoteStore


class DataPlane:
    """Every API's logic over the model pool, the cache and the feature store."""

    def __init__(self, models: ModelPool, config: Callable[[], IngressConfig], *,
                 cache: PredictionCache | None = None,
                 features: FeatureBackend | None = None,
                 slo: SloSource | None = None,
                 observer: ServingObserver | None = None,
                 after_answer: AfterAnswer | None = None,
                 redis: RemoteStore | None = None,
                 warm_up: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        self.models = models
        self.config = config
        self.cache = cache
        self.observer = observer = observer or ServingObserver()
        # One queue for everything after the answers: the cache's write-backs included.
        self.after_answer = after_answer or (cache.background if cache is not None
                                             else AfterAnswer())
        self.feature_rows = FeatureRowCache(config().features)
        self.catalog = ModelCatalog(models, config)
        self.predictor = Predictor(models, self.catalog, cache,
                                   lambda: config().request_timeout_s, observer)
        self.shadow = ShadowMirror(models.infer_aside, self.catalog.spec,
                                   capacity=lambda: config().shadow_queue,
                                   batch_size=lambda: config().max_batch_size,
                                   timeout_s=lambda: config().request_timeout_s,
                                   observer=observer, queue=self.after_answer)
        # The payload log appends to the process's Redis (none: records dropped, counted).
        self.payloads = PayloadLog(redis,
                                   lambda: config().payloads,
                                   source=f"/keel/ingress/{socket.gethostname()}/{os.getpid()}",
                                   observer=observer, queue=self.after_answer)
        self.drift = DriftMonitor(lambda: config().payloads.drift_window, observer=observer)
        self.inference = Inference(config, self.catalog, self.predictor, self.shadow,
                                   self.payloads, self.drift)
        self.decisions = Decisions(config, self.catalog, self.predictor, self.inference,
                                   self.feature_rows, features, observer)
        self.admin = AdminViews(config, models, self.catalog, cache, self.after_answer,
                                self.feature_rows, self.shadow, slo)
        self._warm_up = warm_up
        self._warming: asyncio.Task[None] | None = None
        #: Serving requests in progress (``max_requests``; the ones turned away are the
        #: request metrics' 503s).
        self.in_progress = 0

    # --- live configuration ------------------------------------------------------------

    def reconfigured(self) -> None:
        """Apply the knobs the data plane holds itself (after the config changed)."""
        config = self.config()
        self.feature_rows.reconfigure(config.features)
        self.decisions.reconfigured()
        if self.cache is not None:
            self.cache.reconfigure(config.cache)

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of the replica's ``max_requests`` places for a serving request, or
        refuse it at once (``Overloaded``: 503 + Retry-After, before any work)."""
        limit = self.config().max_requests
        if self.in_progress >= limit:
            raise Overloaded(f"the ingress is at its limit of {limit} requests in progress "
                             f"(Ingress user_config max_requests); retry shortly")
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1

    # --- warm-up and health ------------------------------------------------------------

    def start_warming(self) -> None:
        """Begin warming every hop (needs a running loop); readiness waits for it."""
        if self._warm_up is not None and self._warming is None:
            self._warming = asyncio.get_running_loop().create_task(self._warm_up())

    @property
    def warm(self) -> bool:
        task = self._warming
        return task is None or (task.done() and not task.cancelled())

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": server_version(),
                "extensions": ["binary_tensor_data"]}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether every model has a version loaded and every hop has been warmed."""
        # A fleet is probed once (its members load on demand), every other model by its status.
        names = [n for n in self.models.model_names() if self.models.fleet(n) is None]
        fleets = self.models.fleets
        timeout = self.config().ready_timeout_s
        warming = self._warming
        if warming is not None and not warming.done():
            await asyncio.wait([warming], timeout=timeout)
        results, probes = await asyncio.gather(
            asyncio.gather(*(asyncio.wait_for(self.catalog.status(n, fresh=True), timeout)
                             for n in names), return_exceptions=True),
            asyncio.gather(*(asyncio.wait_for(f.warm_up(), timeout) for f in fleets),
                           return_exceptions=True))
        models: dict[str, Any] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, ModelStatus):
                models[name] = {"ready": result.served_version is not None,
                                "version": result.served_version,
                                "placement": self.models.placement(name)}
            else:
                models[name] = {"ready": False, "error": describe(result)}
        fleet_states: dict[str, Any] = {}
        for fleet, probe in zip(fleets, probes, strict=True):
            state: dict[str, Any] = {"ready": probe is None, "models": len(fleet.model_names())}
            if isinstance(probe, BaseException):
                state["error"] = describe(probe)
            fleet_states[fleet.fleet] = state
        is_ready = bool(names or fleets) and self.warm and all(
            m["ready"] for m in (*models.values(), *fleet_states.values()))
        body: dict[str, Any] = {"ready": is_ready, "models": models}
        if fleet_states:
            body["fleets"] = fleet_states
        if not self.warm:
            body["warming"] = True
        return is_ready, body

    async def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        spec = await self.catalog.spec(name, version)
        status = await self.catalog.status(name)
        document = codec.model_metadata(spec, status.available_versions)
        document["parameters"] = {
            "served_version": status.served_version,
            "loaded_versions": sorted(status.loaded),
            "decision": spec.decision.model_dump() if spec.decision else None,
            "batch_invariant": spec.batch_invariant,
            "metrics": spec.metrics,
            "providers": status.providers,
            "placement": self.models.placement(name),
            "fleet": self.models.fleet(name),
            # This replica's coalescing so far: requests ("items") per model call ("batches":
            # ONNX Runtime runs in the ingress, handle calls to a deployment).
            "coalescing": self.models.batch_stats(name),
        }
        return document

    async def model_ready(self, name: str, version: str | None) -> tuple[bool, dict[str, Any]]:
        try:
            status = await self.catalog.status(name, fresh=True)
        except KeelError as exc:
            if exc.status < 500:  # unknown model: 404 stays 404
                raise
            return False, {"name": name, "ready": False, "error": exc.message}
        if version is not None and version not in status.available_versions \
                and version not in status.loaded:
            raise ModelNotFound(f"model {name!r} has no version {quoted(version)} "
                                f"(versions: {status.available_versions})")
        is_ready = (status.served_version is not None if version is None
                    else version in status.loaded)
        body: dict[str, Any] = {"name": name, "ready": is_ready}
        if version is not None:
            body["version"] = version
        return is_ready, body
