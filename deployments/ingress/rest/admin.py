"""Operational routes over the data plane: ``/v1/slo``, ``/v1/cache`` and
``/v1/rollouts``. HTTP only."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.rest import openapi
from deployments.observability.slo import SloReport


def add_admin_routes(app: FastAPI, plane: DataPlane) -> None:

    @app.get("/v1/slo", summary="SLOs of the whole application over rolling windows",
             response_model=SloReport, responses=openapi.errors(503))
    async def slo_report() -> SloReport:
        return await plane.admin.slo_report()

    @app.get("/v1/cache", summary="Prediction cache state, costs and counters, and the "
                                  "feature rows held for /v1/decide")
    async def cache_state() -> dict[str, Any]:
        return plane.admin.cache_state()

    @app.get("/v1/rollouts", summary="Each model's versions, traffic split and shadow, and "
                                     "the shadow's comparison with live answers (this "
                                     "replica)")
    async def rollouts() -> dict[str, Any]:
        return await plane.admin.rollouts()

    @app.get("/v1/payloads", summary="The payload log: sampling rate, stream, and records "
                                     "appended and dropped (this replica)")
    async def payloads() -> dict[str, Any]:
        return {**plane.payloads.state(), "drift": plane.drift.state()}
