"""Open Inference Protocol inference over the data plane: the version chosen, the
inputs checked against it, the prediction cache where it pays, the model for the rest;
then, after the answer, the shadow copy and the payload record. No transport, no Ray."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from deployments.contracts import InferenceRequest, RequestCache
from deployments.errors import ModelNotFound
from deployments.ingress.auth import current_caller
from deployments.ingress.dataplane import codec
from deployments.ingress.dataplane.catalog import ModelCatalog
from deployments.ingress.dataplane.config import IngressConfig
from deployments.ingress.dataplane.predictor import Prediction, Predictor, summarise
from deployments.ingress.rollout.drift import DriftMonitor
from deployments.ingress.rollout.payload_log import PayloadLog, make_event
from deployments.ingress.rollout.shadow import ShadowMirror
from deployments.ingress.rollout.split import choose_version


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
class Inference:
    """``infer`` (a body) and ``predict`` (a parsed request, any transport's)."""

    config: Callable[[], IngressConfig]
    catalog: ModelCatalog
    predictor: Predictor
    shadow: ShadowMirror
    payloads: PayloadLog
    drift: DriftMonitor

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
            self.mirror(name, prediction, inputs)
        if self.payloads.sampled():
            self.log_payload("infer", request.id, prediction, inputs, deadline)
        return prediction

    def log_payload(self, endpoint: str, request_id: str | None, prediction: Prediction,
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

    def mirror(self, name: str, prediction: Prediction, inputs: dict[str, np.ndarray]) -> None:
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
