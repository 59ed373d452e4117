"""The two hot routes without FastAPI's per-request machinery. No Ray here.

``POST /v2/models/{name}[/versions/{version}]/infer`` and ``POST /v1/decide`` are
answered by this ASGI middleware straight from the data plane: the same body reading
(``http.read_body``: media types, limits), the same data plane calls, the same answers
and error bodies (``http.error_answer``) as the FastAPI routes in ``oip.py`` and
``decide.py`` (which stay, for the OpenAPI document, and serve these paths whenever API
keys are on, so that the auth dependency sees every request). Measured: FastAPI's
routing, dependency solving and exception middlewares took ~20 % of the ingress's CPU
per request (py-spy).

It sits inside the telemetry middleware and sets the matched route (``scope["route"]``)
and path parameters the way Starlette's router would, so metrics and spans are the same.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.rest.decide import decide_response
from deployments.ingress.rest.http import error_answer
from deployments.ingress.rest.oip import infer_response

log = logging.getLogger(__name__)

Scope = dict[str, Any]

_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
DECIDE_PATH = "/v1/decide"


class HotRoutes:
    """ASGI middleware: infer and decide straight to the data plane; everything else on."""

    def __init__(self, app: Any, plane: DataPlane, routes: FastAPI) -> None:
        self.app = app
        self.plane = plane
        # The router's own route objects, so that scope["route"] is what it would be.
        self._routes = {getattr(r, "path", None): r for r in routes.routes}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path == DECIDE_PATH:
            scope["route"] = self._routes.get(DECIDE_PATH)
            scope["path_params"] = {}
            await self._answer(scope, receive, send, self._decide)
            return
        match = _INFER.match(path)
        if match is None:
            await self.app(scope, receive, send)
            return
        name, version = match.group(1), match.group(2)
        template = ("/v2/models/{name}/infer" if version is None
                    else "/v2/models/{name}/versions/{version}/infer")
        scope["route"] = self._routes.get(template)
        scope["path_params"] = ({"name": name} if version is None
                                else {"name": name, "version": version})
        await self._answer(scope, receive, send, self._infer)

    async def _answer(self, scope: Scope, receive: Any, send: Any, handler: Any) -> None:
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except Exception as exc:
            response = error_answer(exc)
        await response(scope, receive, send)

    async def _infer(self, request: Request) -> Response:
        params = request.scope["path_params"]
        return await infer_response(self.plane, params["name"], params.get("version"), request)

    async def _decide(self, request: Request) -> Response:
        return await decide_response(self.plane, request)
