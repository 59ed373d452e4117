"""``/v1/decide`` over the data plane: each entity's version, its features (held rows
within their staleness, one coalesced lookup for the rest), then the model through the
ordinary inference path. No transport, no Ray."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
from pydantic import ValidationError

from deployments.contracts import DecideRequest, RequestCache, RowCache
from deployments.errors import (
    DependencyUnavailable,
    InvalidInput,
    KeelError,
    ModelNotFound,
    field_errors,
)
from deployments.features.core import FeatureRows
from deployments.features.rowcache import FeatureRowCache, assemble
from deployments.ingress.dataplane.catalog import ModelCatalog
from deployments.ingress.dataplane.config import IngressConfig
from deployments.ingress.dataplane.inference import Inference
from deployments.ingress.dataplane.predictor import Predictor, summarise, within_budget
from deployments.ingress.pool.coalescer import Coalescer
from deployments.ingress.rollout.split import choose_version, entity_key
from deployments.observability import tracing
from deployments.observability.events import ServingObserver
from deployments.repository import ModelSpec, TensorSpec

#: One feature lookup: the entities' keys and the feature columns wanted.
Lookup = tuple[list[dict[str, Any]], list[str]]


class FeatureBackend(Protocol):
    """Where ``/v1/decide`` gets features it does not hold: the FeatureService."""

    async def lookup_many(self, lookups: list[Lookup], traces: list[dict[str, str] | None]
                          ) -> Sequence[FeatureRows | KeelError]: ...


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


@dataclass
class Decisions:
    """``/v1/decide``: entities in, one scored and thresholded row per entity out."""

    config: Callable[[], IngressConfig]
    catalog: ModelCatalog
    predictor: Predictor
    inference: Inference
    feature_rows: FeatureRowCache
    features: FeatureBackend | None
    observer: ServingObserver
    #: The FeatureService's lookups of concurrent requests, coalesced.
    _lookups: Coalescer[tuple[Lookup, dict[str, str] | None], FeatureRows] | None = field(
        init=False, default=None)

    def __post_init__(self) -> None:
        if self.features is not None:
            config = self.config()
            self._lookups = Coalescer(self._lookup_batch,
                                      max_batch_size=config.max_batch_size,
                                      max_in_flight=config.calls_in_flight)

    def reconfigured(self) -> None:
        config = self.config()
        if self._lookups is not None:
            self._lookups.max_batch_size = config.max_batch_size
            self._lookups.max_in_flight = config.calls_in_flight

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
            groups[await self.inference.route(ask.model, ask.version, route_key)] = \
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
            self.inference.mirror(model, prediction, inputs)
        if self.inference.payloads.sampled():
            self.inference.log_payload("decide", None, prediction, inputs, deadline, entities)
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
        if table.event_timestamps:
            self.observer.feature_ages(table.ages_s(time.time()))


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
