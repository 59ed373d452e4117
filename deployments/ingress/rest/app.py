"""The ingress's REST application, built in three readable steps over the data plane.

No Ray here. ``create_app`` wires (1) endpoints: one router per API, each over the
transport-free ``DataPlane``; (2) handlers: Keel's error answers; (3) middlewares:
one telemetry middleware (metrics, SLO events, spans) and, only when auth is on, the
API-key check. ``deployment.py`` gives it Ray handles; tests give it models in process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request

from deployments.contracts import InferenceRequest
from deployments.ingress.auth import (
    API_KEY_SCOPE_KEY,
    EXEMPT_ROUTES,
    AuthConfig,
    Caller,
    authenticate,
    authorize,
    current_caller,
)
from deployments.ingress.dataplane.config import IngressConfig, server_version
from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.pool.placement import ModelBackend, ModelPool
from deployments.ingress.rest import openapi
from deployments.ingress.rest.admin import add_admin_routes
from deployments.ingress.rest.decide import add_decide_routes
from deployments.ingress.rest.hot_routes import HotRoutes
from deployments.ingress.rest.http import install_error_handlers
from deployments.ingress.rest.llm import LLMBackend, add_llm_routes
from deployments.ingress.rest.oip import add_oip_routes
from deployments.llm.chat import ChatRequest
from deployments.observability.asgi import RequestObserver, Telemetry
from deployments.observability.events import ServingObserver

__all__ = ["IngressConfig", "build_plane", "create_app", "create_rest_app"]


def build_plane(models: ModelPool | ModelBackend, config: Callable[[], IngressConfig], *,
                observer: ServingObserver | None = None, **options: Any) -> DataPlane:
    """The data plane over ``models`` (a ``ModelPool``, or one backend all its models are
    reached through); ``observer`` hears everything it serves; ``options`` are the
    ``DataPlane``'s (cache, features, slo, after_answer, warm_up)."""
    pool = models if isinstance(models, ModelPool) else ModelPool(
        None, models, max_batch_size=lambda _: config().max_batch_size,
        max_in_flight=lambda: config().calls_in_flight, observer=observer)
    return DataPlane(pool, config, observer=observer, **options)


def create_rest_app(plane: DataPlane, *, observer: RequestObserver | None = None,
                    llm: LLMBackend | None = None, auth: AuthConfig | None = None) -> FastAPI:
    """The REST application over ``plane``. ``llm`` serves ``/v1/chat/completions`` and
    ``/v1/llm/usage`` (503 without it); ``auth`` (default off) requires an API key on every
    API route but the probes and ``/v2``: an app-level dependency, so a route added later
    is covered too."""
    auth = auth or AuthConfig()
    dependencies = [Depends(_key_check(auth))] if auth.enabled else []
    app = FastAPI(
        dependencies=dependencies,
        title="Keel",
        version=server_version(),
        description="ONNX model serving on Ray Serve: the Open Inference Protocol "
                    "(KServe V2) and an entity-keyed decision API over Feast features.",
        # FastAPI's own spans take their parent from the HTTP headers, not from the span
        # Ray Serve opened for the request: without a traceparent they would start a
        # second trace. Keel's keel.request span (observability/asgi.py) replaces them.
        telemetry={"tracing": False},
    )
    app.state.plane = plane
    # 1. endpoints
    add_oip_routes(app, plane)
    add_decide_routes(app, plane)
    add_admin_routes(app, plane)
    add_llm_routes(app, llm, lambda: plane.config().max_body_bytes)
    openapi.install(app, [InferenceRequest, ChatRequest], auth_exempt=EXEMPT_ROUTES)
    # 2. handlers
    install_error_handlers(app)
    # 3. middlewares (the last added is the outermost): the hot routes straight to the data
    # plane unless API keys are on (then every request takes the auth dependency), inside
    # the one telemetry middleware
    if not auth.enabled:
        app.add_middleware(HotRoutes, plane=plane, routes=app)
    app.add_middleware(Telemetry, observer=observer)
    return app


def _key_check(auth: AuthConfig) -> Callable[[Request], Awaitable[None]]:
    async def require_key(request: Request) -> None:
        route = getattr(request.scope.get("route"), "path", None)
        if route in EXEMPT_ROUTES:
            return
        key = authenticate(auth, request.headers)
        request.scope[API_KEY_SCOPE_KEY] = key
        current_caller.set(Caller(key.name, key.tenant))  # the payload log's key and tenant
        model = request.path_params.get("name")
        if model is not None:
            authorize(key, str(model))

    return require_key


def create_app(models: ModelPool | ModelBackend, config: Callable[[], IngressConfig], *,
               observer: ServingObserver | None = None, llm: LLMBackend | None = None,
               auth: AuthConfig | None = None, **options: Any) -> FastAPI:
    """``build_plane`` + ``create_rest_app`` in one call (tests, the single-process bench)."""
    plane = build_plane(models, config, observer=observer, **options)
    return create_rest_app(plane, observer=observer, llm=llm, auth=auth)
