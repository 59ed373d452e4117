"""Open Inference Protocol (KServe V2) REST routes over the data plane. HTTP only."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from deployments.contracts import InferenceRequest, InferenceResponse, ModelMetadata, ServerMetadata
from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.rest import openapi
from deployments.ingress.rest.http import (
    JSON_OR_BINARY,
    VERSION_SCOPE_KEY,
    JSONBody,
    binary_json_length,
    read_body,
)
from deployments.ingress.rollout.split import ROUTE_KEY_HEADER

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


def add_oip_routes(app: FastAPI, plane: DataPlane) -> None:
    """``/v2``, the health probes, model metadata and readiness, and infer."""

    @app.get("/v2", summary="Server metadata", response_model=None,
             responses={200: openapi.response(ServerMetadata, "Name, version, extensions")})
    async def server_metadata() -> Response:
        return JSONBody(plane.server_metadata())

    @app.get("/v2/health/live", summary="Liveness")
    async def live() -> Response:
        return JSONBody({"live": True})

    @app.get("/v2/health/ready",
             summary="Readiness: every model has a version loaded and every hop is warm",
             responses={200: openapi.response(openapi.ServerReadiness, "Every model is ready"),
                        503: openapi.response(openapi.ServerReadiness,
                                              "A model is not ready, or the ingress is still "
                                              "warming up; each says why")})
    async def ready() -> Response:
        is_ready, body = await plane.ready()
        return JSONBody(body, status_code=200 if is_ready else 503)

    @app.get("/v2/models/{name}", summary="Model metadata (served version)",
             response_model=None, responses=_METADATA_RESPONSES)
    async def model_metadata(name: str) -> Response:
        return JSONBody(await plane.model_metadata(name, None))

    @app.get("/v2/models/{name}/versions/{version}", summary="Model metadata (one version)",
             response_model=None, responses=_METADATA_RESPONSES)
    async def model_version_metadata(name: str, version: str) -> Response:
        return JSONBody(await plane.model_metadata(name, version))

    @app.get("/v2/models/{name}/ready", summary="Model readiness (served version)",
             responses=_READY_RESPONSES)
    async def model_ready(name: str) -> Response:
        is_ready, body = await plane.model_ready(name, None)
        return JSONBody(body, status_code=200 if is_ready else 503)

    @app.get("/v2/models/{name}/versions/{version}/ready", summary="Model readiness (version)",
             responses=_READY_RESPONSES)
    async def model_version_ready(name: str, version: str) -> Response:
        is_ready, body = await plane.model_ready(name, version)
        return JSONBody(body, status_code=200 if is_ready else 503)

    @app.post("/v2/models/{name}/infer", summary="Inference (served version)",
              responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY)
    async def infer(name: str, request: Request) -> Response:
        return await infer_response(plane, name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer", summary="Inference (one version)",
              responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await infer_response(plane, name, version, request)


async def infer_response(plane: DataPlane, name: str, version: str | None,
                         request: Request) -> Response:
    """One infer request, body to answer (this route and the hot path, fastpath.py)."""
    with plane.admitted():  # 503 before anything else when the replica is full
        plane.catalog.require(name)  # 404 before reading any body
        body = await read_body(request, plane.config().max_body_bytes, JSON_OR_BINARY)
        answer = await plane.inference.infer(name, version, body, binary_json_length(request),
                                   request.headers.get(ROUTE_KEY_HEADER))
    request.scope[VERSION_SCOPE_KEY] = answer.version
    headers: dict[str, str] = {"X-Keel-Cache": answer.cache}
    if answer.json_length is None:
        return Response(answer.body, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(answer.json_length)
    return Response(answer.body, media_type="application/octet-stream", headers=headers)
