"""Answer validated rows from the prediction cache, sending only the misses to the model.

No Ray here. ``Predictor.predict`` is the one path both ``/v2/.../infer`` and
``/v1/decide`` take once their inputs are arrays: key each row with the version
the catalog says is served, look all keys up at once, call the model for the
missed rows only (pinned to that same version, so a swap between keying and
answering can never store one version's answer under another's key), write them
back, and put the rows together again in request order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from deployments.cache.core import PredictionCache
from deployments.contracts import InferCall, InferResult, ModelStatus, RequestCache, RowCache
from deployments.errors import ModelNotFound, UpstreamTimeout
from deployments.observability import tracing
from deployments.repository import ModelSpec

T = TypeVar("T")


class ModelCaller(Protocol):
    """Where the predictor sends validated calls (``models.ModelPool``: coalesced, in the
    ingress or through a handle)."""

    def model_names(self) -> list[str]: ...

    async def status(self, name: str) -> ModelStatus: ...

    async def infer(self, name: str, call: InferCall) -> InferResult: ...

    def placement(self, name: str) -> str: ...


class CallObserver(Protocol):
    """Told how long each model call took, and whether it succeeded."""

    def model_call(self, model: str, latency_ms: float, ok: bool) -> None: ...


class SpecSource(Protocol):
    """The ingress's model catalog, as the predictor needs it."""

    async def spec(self, name: str, version: str | None) -> ModelSpec: ...

    async def status(self, name: str, *, fresh: bool = False) -> ModelStatus: ...

    def saw_version(self, name: str, version: str) -> None: ...


@dataclass
class Prediction:
    """The outputs of every row of one request, and how they were obtained."""

    spec: ModelSpec
    outputs: dict[str, np.ndarray]
    #: Per row (see :data:`~deployments.contracts.RowCache`).
    cache: list[RowCache]
    cache_ms: float = 0.0
    model_ms: float = 0.0
    batch_size: int = 0

    @property
    def version(self) -> str:
        return self.spec.version


def cacheable(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> bool:
    """Per-row caching needs a free batch dimension on every input and output."""
    if not all(t.batched for t in spec.inputs) or not all(t.batched for t in spec.outputs):
        return False
    return all(a.ndim >= 1 and a.shape[0] > 0 and a.dtype.kind != "O" for a in inputs.values())


@dataclass
class Predictor:
    """Rows in, outputs out: cache first, the model for the rest (see module docstring)."""

    backend: ModelCaller
    catalog: SpecSource
    cache: PredictionCache | None
    #: A request's time budget (the Ingress's ``request_timeout_s``), read per request.
    timeout_s: Callable[[], float]
    observer: CallObserver | None = None

    async def predict(self, name: str, version: str | None, inputs: dict[str, np.ndarray],
                      outputs: list[str] | None = None, *,
                      deadline: float | None = None) -> Prediction:
        """Every row's outputs (only ``outputs`` if given) from the version asked for or served.

        ``inputs`` must already be validated against that version's spec. ``deadline``
        (``time.monotonic()``) bounds the model call; without it the call gets the whole
        configured timeout.
        """
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s()
        spec = await self.catalog.spec(name, version)
        cache = self.cache
        if cache is None or not cacheable(spec, inputs) or not cache.use_for(name):
            return await self._uncached(name, version, spec, inputs, outputs, deadline)
        try:
            prediction = await self._cached(cache, name, spec, inputs, deadline)
        except ModelNotFound as exc:
            if version is not None:
                raise
            # The version we keyed with is not loaded where the call went: the served
            # version moved on and unloaded it, or (mid-rollout) the replica that answered
            # has not reached it yet. Key again with the version that replica serves.
            status = await self.catalog.status(name, fresh=True)
            serving = exc.serving if exc.serving != spec.version else None
            spec = await self.catalog.spec(
                name, serving if serving in status.loaded else None)
            prediction = await self._cached(cache, name, spec, inputs, deadline)
        if outputs:
            prediction.outputs = {k: v for k, v in prediction.outputs.items() if k in outputs}
        return prediction

    async def _uncached(self, name: str, version: str | None, spec: ModelSpec,
                        inputs: dict[str, np.ndarray], outputs: list[str] | None,
                        deadline: float) -> Prediction:
        started = time.perf_counter()
        result = await self._call(name, InferCall(inputs=inputs, version=version, outputs=outputs),
                                  deadline)
        if self.cache is not None:
            self.cache.costs.compute(name, self._compute_cost(name, started, result))
        self.catalog.saw_version(name, result.model_version)
        if result.model_version != spec.version:
            spec = await self.catalog.spec(name, result.model_version)
        n_rows = _n_rows(inputs)
        return Prediction(spec=spec, outputs=result.outputs, cache=["off"] * n_rows,
                          model_ms=(time.perf_counter() - started) * 1000,
                          batch_size=result.batch_size)

    async def _cached(self, cache: PredictionCache, name: str, spec: ModelSpec,
                      inputs: dict[str, np.ndarray], deadline: float) -> Prediction:
        started = time.perf_counter()
        keys = cache.keys(name, spec.version, inputs)
        model_ms = 0.0
        compute_cost = 0.0
        batch_size = 0

        async def compute(rows: list[int]) -> dict[str, np.ndarray]:
            nonlocal model_ms, compute_cost, batch_size
            began = time.perf_counter()
            index = np.asarray(rows, dtype=np.intp)
            subset = {k: v[index] for k, v in inputs.items()}
            result = await self._call(name, InferCall(inputs=subset, version=spec.version),
                                      deadline)
            model_ms += (time.perf_counter() - began) * 1000
            compute_cost += self._compute_cost(name, began, result)
            batch_size = max(batch_size, result.batch_size)
            return result.outputs

        # One span for the lookup, the model call for the misses (a child) and the merge.
        with tracing.span("keel.cache.fetch", {"keel.model": name,
                                               "keel.model.version": spec.version,
                                               "keel.rows": len(keys)}) as span:
            outputs, statuses = await cache.fetch(name, keys, compute, spec.version)
            if span is not None:
                span.set_attribute("keel.cache.result", summarise(statuses))
                span.set_attribute("keel.cache.hits", statuses.count("hit"))
        total_ms = (time.perf_counter() - started) * 1000
        cache_ms = max(0.0, total_ms - model_ms)
        cache.costs.lookup(name, cache_ms)
        if compute_cost:
            cache.costs.compute(name, compute_cost)
        return Prediction(spec=spec, outputs=outputs, cache=list[RowCache](statuses),
                          cache_ms=cache_ms, model_ms=model_ms, batch_size=batch_size)

    def _compute_cost(self, name: str, started: float, result: InferResult) -> float:
        """What computing the rows cost, for the cache's policy: for a model in the ingress,
        its own run (the wait in this busy event loop is not the model's, and a lookup
        would pay it too); for one behind a hop, the whole call."""
        if self.backend.placement(name) == "ingress":
            return result.model_ms
        return (time.perf_counter() - started) * 1000

    async def _call(self, name: str, call: InferCall, deadline: float) -> InferResult:
        started = time.perf_counter()
        ok = False
        call.trace = tracing.carrier()  # the model's batch span links this request
        try:
            result = await within_budget(self.backend.infer(name, call), deadline, "model",
                                         f"model {name!r}", self.timeout_s())
            ok = True
            return result
        finally:
            if self.observer is not None:
                self.observer.model_call(name, (time.perf_counter() - started) * 1000, ok)


async def within_budget(call: Awaitable[T], deadline: float, stage: str, what: str,
                        budget_s: float) -> T:
    """Await ``call`` for what is left of a request's budget (``deadline``, on
    ``time.monotonic()``). Past it the call is cancelled (the backend cancels the work
    behind it) and the request answers 504 naming ``stage``. With nothing left, the call
    is cancelled before it starts."""
    try:
        return await asyncio.wait_for(call, deadline - time.monotonic())
    except TimeoutError as exc:
        raise UpstreamTimeout(f"{what} did not answer within the request's {budget_s} s"
                              ).at(stage) from exc


def _n_rows(inputs: dict[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()))
    return int(first.shape[0]) if first.ndim else 1


def summarise(statuses: Sequence[RowCache]) -> RequestCache:
    """One word for a request's rows: hit (none computed for it: cached or shared with a
    concurrent request), miss (all computed), partial, or off (cache not used)."""
    kinds = set(statuses)
    if kinds <= {"off"}:
        return "off"
    if kinds <= {"hit", "shared"}:
        return "hit"
    if kinds == {"miss"}:
        return "miss"
    return "partial"

