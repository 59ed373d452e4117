"""What the ingress's OpenAPI document says beyond what FastAPI infers.

The POST routes read their bodies by hand (within ``max_body_bytes``, and the
Open Inference Protocol's binary tensor extension is not JSON at all), so FastAPI
cannot see their request bodies; and every error is Keel's ``{"error": ...}``
answer, never FastAPI's 422. The helpers here declare both, so that a client
generated from ``/openapi.json`` (and the schema fuzz test) sees what the routes
really accept and answer. No Ray here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

#: Request media types of the inference routes: the JSON body, or the binary tensor data
#: extension (a JSON header of ``Inference-Header-Content-Length`` bytes, then raw
#: tensors). tritonclient's aio client sends the latter as application/octet-stream, its
#: sync client with no Content-Type at all; both are accepted.
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"

_REF = "#/components/schemas/{model}"


class ErrorBody(BaseModel):
    """Every error Keel answers: a message that names the field or the stage."""

    model_config = ConfigDict(extra="forbid")

    error: str = Field(description="What went wrong, naming the field, model or stage")
    stage: str | None = Field(default=None, description="The step of the request path that "
                                                        "failed (features, model, ...)")


class ModelReadiness(BaseModel):
    """One model in ``GET /v2/health/ready``."""

    ready: bool
    version: str | None = None
    error: str | None = None


class ServerReadiness(BaseModel):
    """``GET /v2/health/ready`` (200 when every model is ready, else 503)."""

    ready: bool
    models: dict[str, ModelReadiness]


class ModelReady(BaseModel):
    """``GET /v2/models/{name}[/versions/{version}]/ready`` (200 ready, else 503)."""

    name: str
    ready: bool
    version: str | None = None
    error: str | None = None


_DESCRIPTIONS = {
    400: "Bad request; the message names the field",
    404: "Unknown model or version (or an entity not in the feature store)",
    413: "Request body over max_body_bytes",
    415: "Unsupported Content-Type or Content-Encoding; the message names it",
    502: "Upstream failed or unreachable",
    503: "A dependency is unavailable or overloaded (Retry-After where it helps)",
    504: "A stage did not answer within the request's time budget; 'stage' names it",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for Keel's error answers with these statuses."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]}
            for status in statuses}


def response(model: type[BaseModel], description: str) -> dict[str, Any]:
    """A ``responses=`` entry documenting a body the route builds by hand."""
    return {"model": model, "description": description}


def json_body(model: type[BaseModel], *, binary: bool = False) -> dict[str, Any]:
    """``openapi_extra`` declaring a hand-read body of ``model`` (referenced in components,
    which ``install`` fills), optionally also in the binary tensor data extension."""
    content: dict[str, Any] = {JSON: {"schema": {"$ref": _REF.format(model=model.__name__)}}}
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": content}}
    if binary:
        content[OCTET_STREAM] = {"schema": {"type": "string", "format": "binary"}}
        extra["parameters"] = [{
            "name": "Inference-Header-Content-Length", "in": "header", "required": False,
            "description": "Binary tensor data extension: the length of the JSON header "
                           "at the start of the body; the tensors follow it",
            "schema": {"type": "integer", "minimum": 0},
        }]
    return extra


#: The 200 answer of the inference routes: JSON, or JSON + binary tensors.
INFER_OK: dict[str, Any] = {
    "description": "The outputs (application/octet-stream when binary outputs were asked "
                   "for: Inference-Header-Content-Length bytes of JSON, then the tensors)",
    "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}},
}


def install(app: FastAPI, bodies: list[type[BaseModel]], *,
            auth_exempt: frozenset[str]) -> None:
    """Replace ``app.openapi`` with a builder that (1) adds the hand-read body models and
    ``ErrorBody`` to the components, (2) drops FastAPI's 422 (Keel answers bad input with
    400 and its own body) and (3) documents 401/403 on every route the API key guards."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(title=app.title, version=app.version,
                               description=app.description, routes=app.routes)
        components = document.setdefault("components", {}).setdefault("schemas", {})
        models: list[type[BaseModel]] = [ErrorBody, *bodies]
        _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
        components.update(defs.get("$defs", {}))
        # Only FastAPI's 422 answers refer to these two; Keel never sends them.
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        for path, operations in document.get("paths", {}).items():
            for operation in operations.values():
                answers = operation.setdefault("responses", {})
                answers.pop("422", None)
                if path not in auth_exempt:
                    answers.setdefault("401", _error_ref("No API key, or an unknown one "
                                                         "(with WWW-Authenticate)"))
                    answers.setdefault("403", _error_ref("The API key may not use this "
                                                         "model"))
        app.openapi_schema = document
        return document

    app.openapi = build  # type: ignore[method-assign]


def _error_ref(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {JSON: {"schema": {"$ref": _REF.format(model="ErrorBody")}}}}
