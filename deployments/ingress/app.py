"""The ingress FastAPI app: Open Inference Protocol (KServe V2) REST routes.

Routes hold no model logic: they read the body within a size limit, validate it
against the served model's declared inputs and call the model through a
``ModelBackend`` (Ray handles in production, see ``deployment.py``). No Ray here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.cache.core import CacheConfig, PredictionCache
from deployments.contracts import (
    DecideRequest,
    DecideResponse,
    DecideTimings,
    Decision,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelStatus,
    ServerMetadata,
)
from deployments.errors import (
    DependencyUnavailable,
    InvalidInput,
    KeelError,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    field_errors,
    quoted,
)
from deployments.ingress import codec, openapi
from deployments.ingress.auth import (
    API_KEY_SCOPE_KEY,
    EXEMPT_ROUTES,
    AuthConfig,
    authenticate,
    authorize,
    key_of,
)
from deployments.ingress.scoring import ModelBackend, Predictor, summarise, within_budget
from deployments.llm.core import ChatRequest
from deployments.llm.routes import LLMBackend, add_llm_routes
from deployments.observability.slo import SloReport
from deployments.repository import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

SERVER_NAME = "keel"


def _server_version() -> str:
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
    #: Longest wait for each model in ``/v2/health/ready``.
    ready_timeout_s: float = Field(default=2.0, gt=0, le=60)
    #: Most entities one ``/v1/decide`` request may name.
    max_entities: int = Field(default=256, ge=1, le=100_000)
    #: Keel's request metrics and SLO events (turn off only to measure what they cost).
    metrics: bool = True
    #: How often this replica sends its SLO events to the SloMonitor.
    slo_push_interval_s: float = Field(default=1.0, gt=0, le=60)
    #: The prediction cache (TTL, hash, fallback size); applied live.
    cache: CacheConfig = Field(default_factory=CacheConfig)


class FeatureBackend(Protocol):
    """Where ``/v1/decide`` gets features: the FeatureService deployment."""

    async def lookup(self, entities: list[dict[str, Any]], features: list[str]) -> FeatureTable:
        ...


class RequestObserver(Protocol):
    """Told about every answered HTTP request and every model call (metrics, SLOs)."""

    def request(self, http_route: str, model: str, status: int, latency_ms: float) -> None: ...

    def model_call(self, model: str, latency_ms: float, ok: bool) -> None: ...


class SloSource(Protocol):
    """Where ``GET /v1/slo`` gets the application-wide SLO figures."""

    async def report(self) -> SloReport: ...


class MeasureRequests:
    """ASGI middleware: each request's route template, model, status and latency go to
    the observer once the answer is sent. Pure ASGI (no BaseHTTPMiddleware overhead);
    an observer that fails is logged, never the request's problem."""

    def __init__(self, app: ASGIApp, observer: RequestObserver) -> None:
        self.app = app
        self.observer = observer
        self._failed_once = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises past every handler

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            model = scope.get(MODEL_SCOPE_KEY) or scope.get("path_params", {}).get("name", "")
            try:
                self.observer.request(route, str(model), status,
                                      (time.perf_counter() - started) * 1000)
            except Exception:
                if not self._failed_once:
                    self._failed_once = True
                    log.exception("request observer failed (logged once)")


#: Where a route that learns its model from the body (/v1/decide) leaves it for metrics.
MODEL_SCOPE_KEY = "keel.model"


class FeatureTable(Protocol):
    """Feature values of some entities: float32 ``[n_entities, n_features]``."""

    values: np.ndarray


@dataclass
class _Cached:
    status: ModelStatus
    fetched: float


@dataclass
class ModelCatalog:
    """The ingress's short-lived copy of each model's status.

    Validation needs the served version's spec on every request; asking the
    model deployment each time would add a hop, so the answer is kept for
    ``status_ttl_s`` and refreshed early when a result reports a new version.
    """

    backend: ModelBackend
    config: Callable[[], IngressConfig]
    _cache: dict[str, _Cached] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def require(self, name: str) -> None:
        """404 for a model this ingress does not serve (before any body is read)."""
        if name not in self.backend.model_names():
            raise ModelNotFound(f"model {quoted(name)} is not served here "
                                f"(models: {self.backend.model_names()})")

    async def status(self, name: str, *, fresh: bool = False) -> ModelStatus:
        self.require(name)
        cached = self._cache.get(name)
        ttl = self.config().status_ttl_s
        if cached and not fresh and time.monotonic() - cached.fetched < ttl:
            return cached.status
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            cached = self._cache.get(name)
            if cached and not fresh and time.monotonic() - cached.fetched < ttl:
                return cached.status
            try:
                status = await self.backend.status(name)
            except KeelError:
                if cached is not None and not fresh:
                    log.warning("model %s: status refresh failed, using the last one", name)
                    return cached.status
                raise
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

    def saw_version(self, name: str, version: str) -> None:
        cached = self._cache.get(name)
        if cached is not None and cached.status.served_version != version:
            self._cache.pop(name, None)


#: What a JSON route reads: JSON, or a body with no Content-Type (tritonclient's sync
#: client sends none).
JSON_ONLY = (openapi.JSON,)
#: What the inference routes read: JSON, or the binary tensor data extension.
JSON_OR_BINARY = (openapi.JSON, openapi.OCTET_STREAM)
def check_media_type(request: Request, accepted: tuple[str, ...]) -> None:
    """415 naming the header for a body the route cannot read as sent: another Content-Type,
    or any Content-Encoding (compressed bodies are refused, never inflated: a small gzip
    body can expand past every limit)."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {quoted(encoding)} is not accepted; "
                                   f"send the body uncompressed")
    raw = request.headers.get("content-type")
    if raw is None:
        return
    media_type = raw.split(";", 1)[0].strip().lower()
    if media_type not in accepted:
        raise UnsupportedMediaType(f"Content-Type {quoted(media_type)} is not accepted here; "
                                   f"send {' or '.join(accepted)}")


async def read_body(request: Request, limit: int,
                    media_types: tuple[str, ...] = JSON_ONLY) -> bytes:
    """Read the body, refusing (415) one in another media type or encoding and (413)
    anything over ``limit`` without reading it all."""
    check_media_type(request, media_types)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError as exc:
            raise InvalidInput("content-length header is not an integer") from exc
        if length < 0:
            raise InvalidInput("content-length header is negative")
        if length > limit:
            raise PayloadTooLarge(f"request body is {length} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def error_response(status: int, message: str, retry_after_s: int | None = None,
                   stage: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    body = {"error": message} if stage is None else {"error": message, "stage": stage}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(backend: ModelBackend, config: Callable[[], IngressConfig], *,
               cache: PredictionCache | None = None,
               features: FeatureBackend | None = None,
               observer: RequestObserver | None = None,
               slo: SloSource | None = None,
               llm: LLMBackend | None = None,
               auth: AuthConfig | None = None) -> FastAPI:
    """Build the ingress app over ``backend``; ``config`` returns the live settings.

    ``cache`` answers repeated rows (both APIs); ``features`` serves ``/v1/decide``
    (without it that route answers 503); ``observer`` hears every request and model
    call; ``slo`` serves ``/v1/slo`` (503 without it); ``llm`` serves
    ``/v1/chat/completions`` and ``/v1/llm/usage`` (503 without it). ``auth`` (default:
    off) requires an API key on every API route but the probes and ``/v2``: an app-level
    dependency, so a route added later is covered too.
    """
    auth = auth or AuthConfig()

    async def require_key(request: Request) -> None:
        if not auth.enabled:
            return
        route = getattr(request.scope.get("route"), "path", None)
        if route in EXEMPT_ROUTES:
            return
        key = authenticate(auth, request.headers)
        request.scope[API_KEY_SCOPE_KEY] = key
        model = request.path_params.get("name")
        if model is not None:
            authorize(key, str(model))

    app = FastAPI(
        dependencies=[Depends(require_key)],
        title="Keel",
        version=_server_version(),
        description="ONNX model serving on Ray Serve: the Open Inference Protocol "
                    "(KServe V2) and an entity-keyed decision API over Feast features.",
        # FastAPI's own spans take their parent from the HTTP headers, not from the span
        # Ray Serve opened for the request: without a traceparent they would start a
        # second trace. Keel's keel.request span (observability/asgi.py) replaces them.
        telemetry={"tracing": False},
    )
    catalog = ModelCatalog(backend, config)
    predictor = Predictor(backend, catalog, cache, lambda: config().request_timeout_s,
                          observer)
    app.state.catalog = catalog
    app.state.predictor = predictor
    if observer is not None:
        app.add_middleware(MeasureRequests, observer=observer)

    @app.exception_handler(KeelError)
    async def _keel_error(_: Request, exc: KeelError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        response = error_response(exc.status, exc.message, exc.retry_after_s, exc.stage)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="keel"'
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "; ".join(field_errors(exc, limit=5)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error ({type(exc).__name__})")

    @app.get("/v2", summary="Server metadata", response_model=None,
             responses={200: openapi.response(ServerMetadata, "Name, version, extensions")})
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": _server_version(),
                "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", summary="Liveness")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Readiness: every model has a version loaded",
             responses={200: openapi.response(openapi.ServerReadiness, "Every model is ready"),
                        503: openapi.response(openapi.ServerReadiness,
                                              "A model is not ready; each says why")})
    async def ready() -> JSONResponse:
        names = backend.model_names()
        timeout = config().ready_timeout_s
        results = await asyncio.gather(
            *(asyncio.wait_for(catalog.status(n, fresh=True), timeout) for n in names),
            return_exceptions=True,
        )
        models: dict[str, Any] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, ModelStatus):
                models[name] = {"ready": result.served_version is not None,
                                "version": result.served_version}
            else:
                models[name] = {"ready": False, "error": _describe(result)}
        is_ready = bool(names) and all(m["ready"] for m in models.values())
        return JSONResponse({"ready": is_ready, "models": models},
                            status_code=200 if is_ready else 503)

    @app.get("/v2/models/{name}", summary="Model metadata (served version)",
             response_model=None, responses=_METADATA_RESPONSES)
    async def model_metadata(name: str) -> dict[str, Any]:
        return await _metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", summary="Model metadata (one version)",
             response_model=None, responses=_METADATA_RESPONSES)
    async def model_version_metadata(name: str, version: str) -> dict[str, Any]:
        return await _metadata(name, version)

    async def _metadata(name: str, version: str | None) -> dict[str, Any]:
        spec = await catalog.spec(name, version)
        status = await catalog.status(name)
        document = codec.model_metadata(spec, status.available_versions)
        document["parameters"] = {
            "served_version": status.served_version,
            "loaded_versions": sorted(status.loaded),
            "decision": spec.decision.model_dump() if spec.decision else None,
            "batch_invariant": spec.batch_invariant,
            "metrics": spec.metrics,
            "providers": status.providers,
        }
        return document

    @app.get("/v2/models/{name}/ready", summary="Model readiness (served version)",
             responses=_READY_RESPONSES)
    async def model_ready(name: str) -> JSONResponse:
        return await _model_ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", summary="Model readiness (version)",
             responses=_READY_RESPONSES)
    async def model_version_ready(name: str, version: str) -> JSONResponse:
        return await _model_ready(name, version)

    async def _model_ready(name: str, version: str | None) -> JSONResponse:
        try:
            status = await catalog.status(name, fresh=True)
        except KeelError as exc:
            if exc.status < 500:  # unknown model: 404 stays 404
                raise
            return JSONResponse({"name": name, "ready": False, "error": exc.message},
                                status_code=503)
        if version is not None and version not in status.available_versions \
                and version not in status.loaded:
            raise ModelNotFound(f"model {name!r} has no version {quoted(version)} "
                                f"(versions: {status.available_versions})")
        is_ready = (status.served_version is not None if version is None
                    else version in status.loaded)
        body: dict[str, Any] = {"name": name, "ready": is_ready}
        if version is not None:
            body["version"] = version
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @app.post("/v2/models/{name}/infer", summary="Inference (served version)",
              responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY)
    async def infer(name: str, request: Request) -> Response:
        return await _infer(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer", summary="Inference (one version)",
              responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await _infer(name, version, request)

    async def _infer(name: str, version: str | None, request: Request) -> Response:
        settings = config()
        deadline = time.monotonic() + settings.request_timeout_s
        catalog.require(name)
        body = await read_body(request, settings.max_body_bytes, JSON_OR_BINARY)
        json_length = _json_length(request)
        parsed, binary = codec.parse_request(body, json_length)
        spec = await catalog.spec(name, version)
        inputs = codec.decode_inputs(parsed, spec, binary)
        outputs = codec.requested_outputs(parsed, spec)
        prediction = await predictor.predict(name, version, inputs, outputs, deadline=deadline)
        content, header_length = codec.encode_response(parsed, prediction.spec,
                                                       prediction.version, prediction.outputs)
        headers = {"X-Keel-Cache": summarise(prediction.cache)}
        if header_length is None:
            return Response(content, media_type="application/json", headers=headers)
        headers["Inference-Header-Content-Length"] = str(header_length)
        return Response(content, media_type="application/octet-stream", headers=headers)

    @app.post("/v1/decide", summary="Score entities over their Feast features",
              response_model=DecideResponse,
              # The body is read within max_body_bytes and parsed here; document its schema.
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": DecideRequest.model_json_schema()}}}},
              responses=openapi.errors(400, 404, 413, 415, 503, 504))
    async def decide(request: Request) -> Response:
        started = time.perf_counter()
        settings = config()
        deadline = time.monotonic() + settings.request_timeout_s
        body = await read_body(request, settings.max_body_bytes)
        try:
            ask = DecideRequest.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidInput("; ".join(field_errors(exc, limit=5))) from exc
        request.scope[MODEL_SCOPE_KEY] = ask.model
        authorize(key_of(request.scope), ask.model)
        if len(ask.entities) > settings.max_entities:
            raise InvalidInput(f"entities: at most {settings.max_entities} entities per "
                               f"request (got {len(ask.entities)})")
        catalog.require(ask.model)
        spec = await catalog.spec(ask.model, ask.version)
        tensor = decision_input(spec)
        columns = list(tensor.columns or [])
        if features is None:
            raise DependencyUnavailable("no feature store is configured for /v1/decide")
        began = time.perf_counter()
        table = await within_budget(features.lookup(ask.entities, columns), deadline,
                                    "features", "the feature store", settings.request_timeout_s)
        features_ms = (time.perf_counter() - began) * 1000
        values = np.asarray(table.values, dtype=tensor.numpy_dtype)
        if values.shape != (len(ask.entities), len(columns)):
            raise DependencyUnavailable(f"the feature store answered {values.shape} values "
                                        f"for {len(ask.entities)} entities x {len(columns)} "
                                        f"features")
        if not tensor.allow_nan and not np.isfinite(values).all():
            row = int(np.argwhere(~np.isfinite(values))[0][0])
            raise InvalidInput(f"entities[{row}]: a feature value is not finite and model "
                               f"{spec.name!r} does not allow NaN")
        prediction = await predictor.predict(ask.model, spec.version, {tensor.name: values},
                                             deadline=deadline)
        timings = DecideTimings(features=round(features_ms, 3),
                                cache=round(prediction.cache_ms, 3),
                                model=round(prediction.model_ms, 3),
                                total=round((time.perf_counter() - started) * 1000, 3))
        rule = prediction.spec.decision
        assert rule is not None  # decision_input checked it
        scores = prediction.outputs[rule.output].reshape(len(ask.entities), -1)[:, rule.index]
        results = [Decision(entity=entity, score=float(score),
                            decision=bool(score >= rule.threshold), threshold=rule.threshold,
                            model=spec.name, model_version=prediction.version, cache=status,
                            timings_ms=timings)
                   for entity, score, status in zip(ask.entities, scores, prediction.cache,
                                                     strict=True)]
        answer = DecideResponse(model=spec.name, model_version=prediction.version,
                                results=results, timings_ms=timings)
        return Response(answer.model_dump_json(), media_type="application/json",
                        headers={"X-Keel-Cache": summarise(prediction.cache)})

    @app.get("/v1/slo", summary="SLOs of the whole application over rolling windows",
             response_model=SloReport, responses=openapi.errors(503))
    async def slo_report() -> SloReport:
        if slo is None:
            raise DependencyUnavailable("no SLO monitor is configured")
        try:
            return await asyncio.wait_for(slo.report(), config().ready_timeout_s)
        except TimeoutError as exc:
            raise DependencyUnavailable("the SLO monitor did not answer", retry_after_s=1) \
                from exc

    @app.get("/v1/cache", summary="Prediction cache state and counters")
    async def cache_state() -> dict[str, Any]:
        if cache is None:
            return {"enabled": False, "remote": None}
        counters = cache.counters
        models = sorted(set(counters.hits) | set(counters.misses) | set(counters.shared))
        return {
            "enabled": cache.config.enabled,
            "remote": "up" if cache.remote_available else
                      ("none" if cache.remote is None else "down"),
            "config": cache.config.model_dump(),
            "errors": counters.errors,
            "corrupt": counters.corrupt,
            "local_entries": len(cache.local),
            "models": {m: {"hits": counters.hits.get(m, 0), "misses": counters.misses.get(m, 0),
                           "shared": counters.shared.get(m, 0),
                           "hit_ratio": counters.hit_ratio(m)} for m in models},
        }

    add_llm_routes(app, llm, lambda: config().max_body_bytes, read_body)
    openapi.install(app, [InferenceRequest, ChatRequest], auth_exempt=EXEMPT_ROUTES)
    return app


#: What the documented routes answer (openapi.py; Keel never answers FastAPI's 422).
_Responses = dict[int | str, dict[str, Any]]
_METADATA_RESPONSES: _Responses = {
    200: openapi.response(ModelMetadata, "The model's metadata"), **openapi.errors(404, 503)}
_READY_RESPONSES: _Responses = {
    200: openapi.response(openapi.ModelReady, "Ready"),
    404: {"model": openapi.ErrorBody, "description": "Unknown model or version"},
    503: openapi.response(openapi.ModelReady, "Not ready; 'error' says why")}
_INFER_RESPONSES: _Responses = {
    200: {"model": InferenceResponse, **openapi.INFER_OK},
    **openapi.errors(400, 404, 413, 415, 503, 504)}
_INFER_BODY = openapi.json_body(InferenceRequest, binary=True)


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


def _json_length(request: Request) -> int | None:
    raw = request.headers.get(codec.BINARY_HEADER)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise InvalidInput(f"{codec.BINARY_HEADER} header is not an integer") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeelError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__
