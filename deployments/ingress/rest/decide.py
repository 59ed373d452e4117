"""``POST /v1/decide``: the entity-keyed decision API over the data plane. HTTP only."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from deployments.contracts import DecideRequest, DecideResponse
from deployments.ingress.auth import authorize, key_of
from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.rest import openapi
from deployments.ingress.rest.http import MODEL_SCOPE_KEY, VERSION_SCOPE_KEY, read_body
from deployments.ingress.rollout.split import ROUTE_KEY_HEADER


def add_decide_routes(app: FastAPI, plane: DataPlane) -> None:

    @app.post("/v1/decide", summary="Score entities over their Feast features",
              response_model=DecideResponse,
              # The body is read within max_body_bytes and parsed here; document its schema.
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": DecideRequest.model_json_schema()}}}},
              responses=openapi.errors(400, 404, 413, 415, 503, 504))
    async def decide(request: Request) -> Response:
        return await decide_response(plane, request)


async def decide_response(plane: DataPlane, request: Request) -> Response:
    """One decide request, body to answer (this route and the hot path, fastpath.py)."""

    def on_model(model: str) -> None:
        request.scope[MODEL_SCOPE_KEY] = model
        authorize(key_of(request.scope), model)

    with plane.admitted():  # 503 before anything else when the replica is full
        body = await read_body(request, plane.config().max_body_bytes)
        answer = await plane.decisions.decide(body, on_model, request.headers.get(ROUTE_KEY_HEADER))
    request.scope[VERSION_SCOPE_KEY] = answer.version
    return Response(answer.body, media_type="application/json",
                    headers={"X-Keel-Cache": answer.cache})
