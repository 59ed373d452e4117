"""The ingress's data plane: what every API does, with no transport and no Ray.

``DataPlane`` answers metadata, readiness, inference, decisions and cache state for
the REST routers (``rest_*.py``) and any other transport: it takes bodies as bytes
and returns bytes or plain data, and raises only ``KeelError``. Behind it:

- ``ModelPool`` (models.py): each model in the ingress or in its own deployment,
  concurrent calls coalesced into one backend call per batch;
- ``Predictor`` (scoring.py): the prediction cache where it pays, the model for the rest;
- ``FeatureRowCache`` + a coalesced ``FeatureBackend`` for ``/v1/decide``.

Work the client does not wait for (cache writes) runs after the answer
(``deployments/background.py``); request metrics and SLO events are recorded by
the transport's telemetry once the answer is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, Protocol

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.cache.core import CacheConfig, PredictionCache
from deployments.contracts import (
    DecideRequest,
    InferenceRequest,
    ModelStatus,
    RequestCache,
    RowCache,
)
from deployments.errors import (
    DependencyUnavailable,
    InvalidInput,
    KeelError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    field_errors,
    quoted,
)
from deployments.features.core import FeatureRows
from deployments.features.rowcache import FeatureCacheConfig, FeatureRowCache, assemble
from deployments.ingress.dataplane import codec
from deployments.ingress.dataplane.predictor import (
    CallObserver,
    Prediction,
    Predictor,
    summarise,
    within_budget,
)
from deployments.ingress.pool.coalescer import Coalescer
from deployments.ingress.pool.placement import ModelPool
from deployments.ingress.rollout.drift import DriftMonitor, DriftObserver
from deployments.ingress.rollout.payload_log import (
    PayloadLog,
    PayloadLogConfig,
    PayloadObserver,
    current_caller,
    make_event,
)
from deployments.ingress.rollout.shadow import ShadowMirror, ShadowObserver
from deployments.ingress.rollout.split import choose_version, entity_key
from deployments.observability import tracing
from deployments.observability.slo import SloReport
from deployments.onnx.core import OnnxModelConfig
from deployments.repository import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

SERVER_NAME = "keel"


def server_version() -> str:
    try:
        return package_version("keel")
    except PackageNotFoundError:
        return "0.0.0"


class IngressConfig(BaseModel):
    """Live knobs of the ingress (its ``user_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Larger bodies get 413 before they are read in full.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    #: A request's time budget in the ingress: each stage (feature lookup, model call)
    #: gets what is left of it; past it the request answers 504 naming the stage, and the
    #: stage's work is cancelled. Keep it below ``http_options.request_timeout_s``.
    request_timeout_s: float = Field(default=30.0, gt=0, le=600)
    #: How long the ingress trusts its copy of a model's status (served version, spec).
    status_ttl_s: float = Field(default=1.0, ge=0, le=300)
    #: Longest wait for each model (and for the warm-up) in ``/v2/health/ready``.
    ready_timeout_s: float = Field(default=2.0, gt=0, le=60)
    #: Most entities one ``/v1/decide`` request may name.
    max_entities: int = Field(default=256, ge=1, le=100_000)
    #: Keel's request metrics and SLO events (turn off only to measure what they cost).
    metrics: bool = True
    #: How often this replica sends its SLO events to the SloMonitor.
    slo_push_interval_s: float = Field(default=1.0, gt=0, le=60)
    #: The prediction cache (TTL, hash, fallback size, policy per model); applied live.
    cache: CacheConfig = Field(default_factory=CacheConfig)
    #: The feature rows ``/v1/decide`` may reuse without asking the FeatureService.
    features: FeatureCacheConfig = Field(default_factory=FeatureCacheConfig)
    #: Live config of each model placed in the ingress (``args.placement``): version,
    #: max_batch_size, ONNX Runtime options, as an ``OnnxModel``'s user_config.
    models: dict[str, OnnxModelConfig] = Field(default_factory=dict)
    #: Inference and decision requests (REST and gRPC) this replica holds at once; more
    #: are answered at once with 503 ``{"error": ...}`` and Retry-After (gRPC: UNAVAILABLE
    #: with ``retry-after``). Keep the deployment's ``max_ongoing_requests`` above it, or
    #: Ray turns requests away first, in plain text (``keel check-config`` refuses that).
    max_requests: int = Field(default=1280, ge=1, le=1_000_000)
    #: Most requests one coalesced call carries to a model deployment or the store.
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    #: A call to a model deployment that has not answered after this many seconds is sent
    #: again beside the first (and again each time as long passes, 4 attempts at most; the
    #: first answer wins); one whose replica died under it is sent again at once.
    #: ``None``: only the latter. Keep it well above the model's p99 under load, and three
    #: times it below ``request_timeout_s``.
    model_call_retry_s: float | None = Field(default=5.0, gt=0, le=600)
    #: Shadow copies (a model's ``shadow``) waiting for their shadow call in this replica;
    #: more are dropped and counted (``keel_shadow_dropped_total``), never waited for.
    #: 0 turns mirroring off here.
    shadow_queue: int = Field(default=1024, ge=0, le=1_000_000)
    #: Payload logging: a sample of answered requests appended to a Redis Stream.
    payloads: PayloadLogConfig = PayloadLogConfig()
    #: Handle calls running at once per model deployment (and to the FeatureService);
    #: requests arriving meanwhile queue into the next call. A model deployment's
    #: autoscaler counts these calls as its ongoing requests.
    calls_in_flight: int = Field(default=4, ge=1, le=256)


class FeatureBackend(Protocol):
    """Where ``/v1/decide`` gets features it does not hold: the FeatureService."""

    async def lookup_many(self, lookups: list[tuple[list[dict[str, Any]], list[str]]],
                          traces: list[dict[str, str] | None]
                          ) -> Sequence[FeatureRows | KeelError]: ...


class FeatureObserver(Protocol):
    """Told the event-time age of the feature rows a decision used, per feature view."""

    def feature_ages(self, ages: dict[str, float]) -> None: ...


class SloSource(Protocol):
    """Where ``GET /v1/slo`` gets the application-wide SLO figures."""

    async def report(self) -> SloReport: ...


@dataclass
class _Cached:
    status: ModelStatus
    fetched: float


#: The longest a request waits for a model's status (its first, or a fresh one): a
#: status call that went to a hung replica must not hold requests for the replica's whole
#: removal (~45 s). Past it: 503 with Retry-After, or the copy already held.
STATUS_TIMEOUT_S = 5.0


@dataclass
class ModelCatalog:
    """The ingress's short-lived copy of each model's status.

    Validation needs the served version's spec on every request; asking the model
    deployment each time would add a hop, so the answer is kept for ``status_ttl_s``. An
    older copy is still used while ONE refresh runs in the background (a request never
    waits for a refresh when a copy is held: a refresh that went to a hung replica then
    delays nobody). A request waits only for a model's first status, or for a fresh one
    (``fresh=True``: a result named a version the copy does not have), at most
    ``STATUS_TIMEOUT_S``. A copy is dropped early when a result reports a new version.
    """

    backend: ModelPool
    config: Callable[[], IngressConfig]
    _cache: dict[str, _Cached] = field(default_factory=dict)
    _refreshing: dict[str, asyncio.Task[ModelStatus]] = field(default_factory=dict)

    def require(self, name: str) -> None:
        """404 for a model this ingress does not serve (before any body is read)."""
        if not self.backend.knows(name):
            raise ModelNotFound(f"model {quoted(name)} is not served here "
                                f"(models: {self.backend.listing()})")

    async def status(self, name: str, *, fresh: bool = False) -> ModelStatus:
        self.require(name)
        cached = self._cache.get(name)
        if cached is not None and not fresh:
            if time.monotonic() - cached.fetched >= self.config().status_ttl_s:
                self._refresh(name)  # in the background; this request keeps the copy held
            return cached.status
        if fresh:  # its own call: one already running may have started before the change
            return await self._fetch(name)
        # Shared by every request waiting for this model's first status; shielded, so a
        # request that gives up does not cancel it for the others.
        return await asyncio.shield(self._refresh(name))

    def _refresh(self, name: str) -> asyncio.Task[ModelStatus]:
        """The refresh of ``name`` in flight, started if there is none."""
        task = self._refreshing.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(name))
            self._refreshing[name] = task
            task.add_done_callback(lambda done: self._refreshed(name, done))
        return task

    def _refreshed(self, name: str, task: asyncio.Task[ModelStatus]) -> None:
        if self._refreshing.get(name) is task:
            del self._refreshing[name]
        if not task.cancelled() and task.exception() is not None and name in self._cache:
            log.warning("model %s: status refresh failed (%s), using the last one", name,
                        task.exception())

    async def _fetch(self, name: str) -> ModelStatus:
        try:
            status = await asyncio.wait_for(self.backend.status(name), STATUS_TIMEOUT_S)
        except TimeoutError as exc:
            raise DependencyUnavailable(f"model {name!r} did not answer a status call within "
                                        f"{STATUS_TIMEOUT_S:g} s", retry_after_s=1) from exc
        self._cache[name] = _Cached(status, time.monotonic())
        return status

    async def spec(self, name: str, version: str | None) -> ModelSpec:
        """The spec to validate against: the pinned version's, or the served one's."""
        status = await self.status(name)
        if version is None:
            if status.served_version is None:
                raise ModelNotReady(f"model {name!r} is not loaded: {status.error or 'loading'}")
            version = status.served_version
        spec = status.loaded.get(version)
        if spec is None:
            status = await self.status(name, fresh=True)
            spec = status.loaded.get(version)
        if spec is None:
            if version in status.available_versions:
                raise ModelNotFound(f"model {name!r} version {quoted(version)} is in the "
                                    f"repository but not loaded (serving "
                                    f"{status.served_version!r})")
            raise ModelNotFound(f"model {name!r} has no version {quoted(version)} "
                                f"(versions: {status.available_versions})")
        return spec

    def held(self, name: str) -> ModelStatus | None:
        """The status this replica holds for ``name``, however old (never a call)."""
        cached = self._cache.get(name)
        return cached.status if cached is not None else None

    def saw_version(self, name: str, version: str) -> None:
        cached = self._cache.get(name)
        if cached is not None and cached.status.served_version != version:
            self._cache.pop(name, None)

    def forget(self) -> None:
        """Drop every cached status (after a live reconfiguration of in-ingress models)."""
        self._cache.clear()


@dataclass
class InferAnswer:
    """An inference answer as the transport sends it."""

    body: bytes
    #: With binary outputs: the length of the JSON part (``None``: all JSON).
    json_length: int | None
    cache: RequestCache
    model: str
    version: str


@dataclass
class DecideAnswer:
    body: bytes
    cache: RequestCache
    model: str
    #: The version that scored every entity; ``MIXED`` when a traffic split sent the
    #: entities to different versions (each result names its own).
    version: str


#: A decision whose entities a traffic split sent to different versions.
MIXED = "mixed"


Lookup = tuple[list[dict[str, Any]], list[str]]


class DataPlane:
    """Every API's logic over the model pool, the cache and the feature store."""

    def __init__(self, models: ModelPool, config: Callable[[], IngressConfig], *,
                 cache: PredictionCache | None = None,
                 features: FeatureBackend | None = None,
                 feature_observer: FeatureObserver | None = None,
                 slo: SloSource | None = None,
                 observer: CallObserver | None = None,
                 shadow_observer: ShadowObserver | None = None,
                 payload_observer: PayloadObserver | None = None,
                 drift_observer: DriftObserver | None = None,
                 warm_up: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        self.models = models
        self.config = config
        self.cache = cache
        self.features = features
        self.feature_rows = FeatureRowCache(config().features)
        self._feature_observer = feature_observer
        self.slo = slo
        self.catalog = ModelCatalog(models, config)
        self.predictor = Predictor(models, self.catalog, cache,
                                   lambda: config().request_timeout_s, observer)
        self.shadow = ShadowMirror(models.infer_aside, self.catalog.spec,
                                   capacity=lambda: config().shadow_queue,
                                   batch_size=lambda: config().max_batch_size,
                                   timeout_s=lambda: config().request_timeout_s,
                                   observer=shadow_observer)
        # The payload log writes to the prediction cache's Redis (none: records dropped).
        self.payloads = PayloadLog(cache.remote if cache is not None else None,
                                   lambda: config().payloads,
                                   source=f"/keel/ingress/{socket.gethostname()}/{os.getpid()}",
                                   observer=payload_observer)
        self.drift = DriftMonitor(lambda: config().payloads.drift_window,
                                  observer=drift_observer)
        self._lookups: Coalescer[tuple[Lookup, dict[str, str] | None], FeatureRows] | None = None
        if features is not None:
            self._lookups = Coalescer(self._lookup_batch,
                                      max_batch_size=config().max_batch_size,
                                      max_in_flight=config().calls_in_flight)
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
        if self._lookups is not None:
            self._lookups.max_batch_size = config.max_batch_size
            self._lookups.max_in_flight = config.calls_in_flight
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
                models[name] = {"ready": False, "error": _describe(result)}
        fleet_states: dict[str, Any] = {}
        for fleet, probe in zip(fleets, probes, strict=True):
            state: dict[str, Any] = {"ready": probe is None, "models": len(fleet.model_names())}
            if isinstance(probe, BaseException):
                state["error"] = _describe(probe)
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

    # --- inference -----------------------------------------------------------------------

    async def infer(self, name: str, version: str | None, body: bytes,
                    json_length: int | None, route_key: str | None = None) -> InferAnswer:
        """Open Inference Protocol infer: the body (JSON, or JSON + binary tensors)."""
        deadline = time.monotonic() + self.config().request_timeout_s
        self.catalog.require(name)
        parsed, binary = codec.parse_request(body, json_length)
        prediction = await self.predict(name, version, parsed, binary, deadline, route_key)
        content, header_length = codec.encode_response(parsed, prediction.spec,
                                                       prediction.version, prediction.outputs)
        return InferAnswer(content, header_length, summarise(prediction.cache), name,
                           prediction.version)

    async def predict(self, name: str, version: str | None, request: InferenceRequest,
                      binary: bytes, deadline: float, route_key: str | None = None
                      ) -> Prediction:
        """Infer on a parsed request (any transport's): the version chosen (pinned, or the
        model's traffic split by ``route_key``), its inputs checked against that version's
        declared ones, then the cache where it pays and the model for the rest."""
        self.catalog.require(name)
        routed = await self.route(name, version, route_key)
        try:
            prediction, inputs = await self._predict_parsed(name, routed, request, binary,
                                                            deadline)
        except ModelNotFound:
            if version is not None or routed is None:
                raise
            # The split's version was unloaded between the status this replica holds and
            # the call (weights changed under load): the served version answers instead.
            await self.catalog.status(name, fresh=True)
            prediction, inputs = await self._predict_parsed(name, None, request, binary,
                                                            deadline)
        if version is None:  # a pinned request is the client's choice: not mirrored
            self._mirror(name, prediction, inputs)
        if self.payloads.sampled():
            self._log_payload("infer", request.id, prediction, inputs, deadline)
        return prediction

    def _log_payload(self, endpoint: str, request_id: str | None, prediction: Prediction,
                     inputs: dict[str, np.ndarray], deadline: float,
                     entities: list[dict[str, Any]] | None = None) -> None:
        """A sampled answer's record, queued for the payload log (built after the answer);
        ``entities``: /v1/decide's entity keys, logged for the rows logged."""
        started = deadline - self.config().request_timeout_s
        latency_ms = (time.monotonic() - started) * 1000
        caller = current_caller.get()
        self.drift.observe(prediction.spec, inputs)
        self.payloads.offer(lambda config: make_event(
            request_id=request_id, model=prediction.spec.name, version=prediction.version,
            endpoint=endpoint, inputs=inputs, outputs=prediction.outputs,
            cache=prediction.cache, latency_ms=latency_ms, caller=caller,
            source=self.payloads.source, max_rows=config.max_rows,
            extra=None if entities is None else {"entities": entities[:config.max_rows]}))

    async def _predict_parsed(self, name: str, version: str | None, request: InferenceRequest,
                              binary: bytes, deadline: float
                              ) -> tuple[Prediction, dict[str, np.ndarray]]:
        spec = await self.catalog.spec(name, version)
        inputs = codec.decode_inputs(request, spec, binary)
        outputs = codec.requested_outputs(request, spec)
        prediction = await self.predictor.predict(name, version, inputs, outputs,
                                                  deadline=deadline)
        return prediction, inputs

    def _mirror(self, name: str, prediction: Prediction, inputs: dict[str, np.ndarray]) -> None:
        """A copy of an answered request for the model's shadow version, if it has one
        (the status this replica holds says), queued for after the answer."""
        status = self.catalog.held(name)
        if status is not None and status.shadow is not None:
            self.shadow.offer(name, status.shadow, prediction.version, prediction.spec,
                              inputs, prediction.outputs)

    async def route(self, name: str, version: str | None, key: str | None) -> str | None:
        """The version a request goes to: the pinned one; else one the model's traffic
        split picks (by ``key`` when given); else ``None`` (the served version)."""
        if version is not None:
            return version
        status = await self.catalog.status(name)
        if not status.traffic:
            return None
        chosen = choose_version(name, status.traffic, key)
        return chosen if chosen in status.loaded else None

    # --- decisions -----------------------------------------------------------------------

    async def decide(self, body: bytes, on_model: Callable[[str], None] | None = None,
                     route_key: str | None = None) -> DecideAnswer:
        """``/v1/decide``: each entity's version (pinned, or the model's traffic split by
        ``route_key``, else by the entity itself), features for each entity (held rows
        within their staleness, one coalesced lookup for the rest), then the model (cache
        where it pays). ``on_model`` hears the model name as soon as it is known
        (metrics, authorization)."""
        started = time.perf_counter()
        settings = self.config()
        deadline = time.monotonic() + settings.request_timeout_s
        try:
            ask = DecideRequest.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidInput("; ".join(field_errors(exc, limit=5))) from exc
        if on_model is not None:
            on_model(ask.model)
        if len(ask.entities) > settings.max_entities:
            raise InvalidInput(f"entities: at most {settings.max_entities} entities per "
                               f"request (got {len(ask.entities)})")
        self.catalog.require(ask.model)
        groups: dict[str | None, list[int]] = {}
        model_status = await self.catalog.status(ask.model)
        split = model_status.traffic
        if ask.version is not None or not split or route_key is not None:
            # One version for the whole request: pinned, unsplit, or one route key.
            groups[await self.route(ask.model, ask.version, route_key)] = \
                list(range(len(ask.entities)))
        else:
            for i, entity in enumerate(ask.entities):
                chosen = choose_version(ask.model, split, entity_key(entity))
                groups.setdefault(chosen if chosen in model_status.loaded else None,
                                  []).append(i)
        parts = await asyncio.gather(*(
            self._decide_group(ask.model, version, ask.version is not None,
                               [ask.entities[i] for i in members], deadline)
            for version, members in groups.items()))
        results: list[dict[str, Any]] = [{}] * len(ask.entities)
        statuses: list[RowCache] = ["off"] * len(ask.entities)
        total_ms = round((time.perf_counter() - started) * 1000, 3)
        for members, (rows, row_statuses) in zip(groups.values(), parts, strict=True):
            for i, row, status in zip(members, rows, row_statuses, strict=True):
                row["timings_ms"]["total"] = total_ms
                results[i] = row
                statuses[i] = status
        versions = {row["model_version"] for row in results}
        version = versions.pop() if len(versions) == 1 else MIXED
        timings = {stage: max(row["timings_ms"][stage] for row in results)
                   for stage in ("features", "cache", "model")}
        timings["total"] = total_ms
        answer = {"model": ask.model, "model_version": version, "results": results,
                  "timings_ms": timings}
        return DecideAnswer(orjson.dumps(answer), summarise(statuses), ask.model, version)

    async def _decide_group(self, model: str, version: str | None, pinned: bool,
                            entities: list[dict[str, Any]], deadline: float
                            ) -> tuple[list[dict[str, Any]], list[RowCache]]:
        """Score entities on one version (``None``: the served one); the result rows (their
        ``timings_ms`` without the total) and each row's cache status."""
        try:
            return await self._decide_rows(model, version, entities, deadline, not pinned)
        except ModelNotFound:
            if pinned or version is None:
                raise
            # The split's version was unloaded under this request: the served one answers.
            await self.catalog.status(model, fresh=True)
            return await self._decide_rows(model, None, entities, deadline, True)

    async def _decide_rows(self, model: str, version: str | None,
                           entities: list[dict[str, Any]], deadline: float, mirror: bool
                           ) -> tuple[list[dict[str, Any]], list[RowCache]]:
        spec = await self.catalog.spec(model, version)
        tensor = decision_input(spec)
        columns = list(tensor.columns or [])
        began = time.perf_counter()
        table = await self._features_of(entities, columns, deadline)
        features_ms = (time.perf_counter() - began) * 1000
        values = np.asarray(table.values, dtype=tensor.numpy_dtype)
        if values.shape != (len(entities), len(columns)):
            raise DependencyUnavailable(f"the feature store answered {values.shape} values "
                                        f"for {len(entities)} entities x {len(columns)} "
                                        f"features")
        if not tensor.allow_nan and not np.isfinite(values).all():
            row = int(np.argwhere(~np.isfinite(values))[0][0])
            raise InvalidInput(f"entities[{row}]: a feature value is not finite and model "
                               f"{spec.name!r} does not allow NaN")
        # ``version``, not ``spec.version``: unpinned, the predictor may key again with the
        # version the answering replica serves (mid-rollout, replicas can disagree).
        inputs = {tensor.name: values}
        prediction = await self.predictor.predict(model, version, inputs, deadline=deadline)
        if mirror:
            self._mirror(model, prediction, inputs)
        if self.payloads.sampled():
            self._log_payload("decide", None, prediction, inputs, deadline, entities)
        timings = {"features": round(features_ms, 3), "cache": round(prediction.cache_ms, 3),
                   "model": round(prediction.model_ms, 3)}
        rule = prediction.spec.decision
        if rule is None:  # the answering version is not the one checked above
            raise InvalidInput(f"model: {spec.name!r} version {prediction.version!r} declares "
                               f"no decision rule (model.yaml 'decision')")
        scores = prediction.outputs[rule.output].reshape(len(entities), -1)[:, rule.index]
        rows = [{"entity": entity, "score": score, "decision": score >= rule.threshold,
                 "threshold": rule.threshold, "model": spec.name,
                 "model_version": prediction.version, "cache": status,
                 "timings_ms": dict(timings)}
                for entity, score, status in zip(entities, scores.tolist(), prediction.cache,
                                                 strict=True)]
        return rows, list(prediction.cache)

    async def _features_of(self, entities: list[dict[str, Any]], columns: list[str],
                           deadline: float) -> FeatureRows:
        """The entities' rows: those held within their staleness, the rest looked up."""
        found, missing = self.feature_rows.split(entities, columns)
        fetched: FeatureRows | None = None
        if missing:
            if self._lookups is None:
                raise DependencyUnavailable("no feature store is configured for /v1/decide")
            wanted = [entities[i] for i in missing]
            lookups = self._lookups
            fetched = await within_budget(
                lookups.submit(((wanted, columns), tracing.carrier())), deadline, "features",
                "the feature store", self.config().request_timeout_s)
            self.feature_rows.keep(wanted, columns, fetched)
            if len(missing) == len(entities):
                table = fetched
                self._observe_ages(table)
                return table
        table = assemble(found, fetched, missing, len(columns))
        self._observe_ages(table)
        return table

    async def _lookup_batch(self, items: list[tuple[Lookup, dict[str, str] | None]]
                            ) -> Sequence[FeatureRows | KeelError]:
        assert self.features is not None
        return await self.features.lookup_many([lookup for lookup, _ in items],
                                               [trace for _, trace in items])

    def _observe_ages(self, table: FeatureRows) -> None:
        if self._feature_observer is not None and table.event_timestamps:
            self._feature_observer.feature_ages(table.ages_s(time.time()))

    # --- state ---------------------------------------------------------------------------

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
            "writes": cache.background.counts(),
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
                models[name] = {"error": _describe(status)}
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


def decision_input(spec: ModelSpec) -> TensorSpec:
    """The one input that ``/v1/decide`` fills from features, and its feature columns."""
    if spec.decision is None:
        raise InvalidInput(f"model: {spec.name!r} declares no decision rule (model.yaml "
                           f"'decision'); use /v2/models/{spec.name}/infer")
    featured = [t for t in spec.inputs if t.columns]
    if len(spec.inputs) != 1 or len(featured) != 1:
        raise InvalidInput(f"model: {spec.name!r} does not take one feature-store input "
                           f"(model.yaml 'inputs[].columns'); use /v2/models/{spec.name}/infer")
    tensor = featured[0]
    if tensor.shape[0] != -1 or len(tensor.shape) != 2:
        raise InvalidInput(f"model: {spec.name!r} input {tensor.name!r} has shape "
                           f"{tensor.shape}; /v1/decide needs [-1, n_features]")
    return tensor


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeelError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__
