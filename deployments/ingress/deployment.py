"""``Ingress``: the Ray Serve shell around the FastAPI app (handles, reconfigure)."""

from __future__ import annotations

import logging
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

from deployments.contracts import InferCall, InferResult, ModelStatus
from deployments.errors import (
    DependencyUnavailable,
    KeelError,
    ModelNotFound,
    Overloaded,
    parse_user_config,
)
from deployments.ingress.app import IngressConfig, create_app

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
        try:
            result: ModelStatus = await self._handle(name).status.remote()
        except TimeoutError:
            raise
        except Exception as exc:
            raise _as_keel_error(name, exc) from exc
        return result

    async def infer(self, name: str, call: InferCall) -> InferResult:
        try:
            result: InferResult = await self._handle(name).infer.remote(call)
        except TimeoutError:
            raise
        except Exception as exc:
            raise _as_keel_error(name, exc) from exc
        return result


def _as_keel_error(name: str, exc: Exception) -> KeelError:
    if isinstance(exc, KeelError) and not isinstance(exc, RayTaskError):
        return exc
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, KeelError):
            return cause
        log.error("model %s failed: %s", name, exc)
        return DependencyUnavailable(f"model {name!r} failed: {type(cause).__name__}")
    if isinstance(exc, BackPressureError):
        return Overloaded(f"model {name!r} is overloaded; retry shortly")
    if isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError
                  | DeploymentUnavailableError | ReplicaUnavailableError):
        return DependencyUnavailable(f"model {name!r} is unavailable: {type(exc).__name__}",
                                     retry_after_s=1)
    log.error("model %s call failed: %r", name, exc)
    return DependencyUnavailable(f"model {name!r} call failed: {type(exc).__name__}")


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    """The HTTP entry point: Open Inference Protocol routes over the model handles."""

    def __init__(self, models: dict[str, DeploymentHandle]) -> None:
        self._backend = HandleBackend(models)
        self._config = IngressConfig()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._config = parse_user_config(IngressConfig, user_config, "Ingress")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._backend, lambda: self._config)
