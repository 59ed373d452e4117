"""The ingress's Ray side: deployment handles behind Keel's backend interfaces, and
Ray's errors mapped onto Keel's hierarchy (the only ingress module besides
``deployment.py`` that imports ray)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, cast

from opentelemetry.trace import SpanKind
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.contracts import InferCall, InferResult, ModelStatus
from deployments.errors import DependencyUnavailable, KeelError, ModelNotFound, Overloaded
from deployments.features.core import FeatureRows
from deployments.fleet.core import fleet_members, holds
from deployments.ingress.pool.hedge import first_answer
from deployments.llm.chat import ChatAnswer, ChatCall
from deployments.observability import tracing

log = logging.getLogger(__name__)

Lookup = tuple[list[dict[str, Any]], list[str]]

#: A status call with no answer after this long is sent again beside the first (a
#: replica answers one in milliseconds; Serve's router has by then left a replica that
#: took no call for ``deployments.stall.core.STALL_AFTER_S`` out of its choices).
STATUS_RETRY_S = 1.5


class HandleModels:
    """``OnnxModel`` deployments through their handles: one handle call per batch.

    A call that has not answered after ``retry_after_s()`` seconds is sent again beside
    the first, and again each time as long passes; one whose replica died under it is
    sent again at once; the first answer wins (inference has no side effects; see
    ``hedge.first_answer``, at most 4 attempts). A hung or killed replica so costs its
    callers seconds, not their whole time budget and a 504, even when Serve's router
    sends the second attempt to the hung replica too.
    """

    def __init__(self, models: dict[str, DeploymentHandle],
                 retry_after_s: Callable[[], float | None] = lambda: None) -> None:
        self._models = models
        self._names = sorted(models)
        self._retry_after_s = retry_after_s

    def model_names(self) -> list[str]:
        return self._names

    def _handle(self, name: str) -> DeploymentHandle:
        handle = self._models.get(name)
        if handle is None:
            raise ModelNotFound(f"model {name!r} is not served here (models: {self._names})")
        return handle

    async def status(self, name: str) -> ModelStatus:
        """Hedged like a model call, every ``STATUS_RETRY_S``: a status is needed within
        ``dataplane.STATUS_TIMEOUT_S``, and one routed to a hung replica never answers."""
        what = f"model {name!r}"
        handle = self._handle(name)

        def send() -> Any:
            return call(what, handle.status.remote(), "model")

        result: ModelStatus = await first_answer(send, STATUS_RETRY_S, lost=_replica_lost,
                                                 what=f"{what} status")
        return result

    async def infer_many(self, name: str, calls: list[InferCall]
                         ) -> Sequence[InferResult | KeelError]:
        # Ray Serve carries this span's context to the replica; each call's own trace
        # carrier (set by the predictor) lets the batch span there link its request too.
        with tracing.span("keel.model.call", {"keel.model": name, "keel.batch.size": len(calls)},
                          kind=SpanKind.CLIENT, links=tracing.links([c.trace for c in calls])):
            answers = await self._call_with_retries(name, calls)
        return [a.at("model") if isinstance(a, KeelError) and a.status >= 500 else a
                for a in answers]

    async def infer_aside(self, name: str, calls: list[InferCall]
                          ) -> Sequence[InferResult | KeelError]:
        """Shadow copies: their own handle call (never in a live batch), no retry."""
        answers: list[InferResult | KeelError] = await call(
            f"model {name!r}", self._handle(name).infer_aside.remote(calls), "model")
        return answers

    async def _call_with_retries(self, name: str, calls: list[InferCall]
                                 ) -> list[InferResult | KeelError]:
        what = f"model {name!r}"
        handle = self._handle(name)

        def send() -> Any:
            return call(what, handle.infer_many.remote(calls), "model")

        answers: list[InferResult | KeelError] = await first_answer(
            send, self._retry_after_s(), lost=_replica_lost, what=what)
        return answers


def _replica_lost(error: BaseException) -> bool:
    """A call that failed because its replica went away (not inside the model): the
    failure Keel answers with Retry-After."""
    return isinstance(error, DependencyUnavailable) and error.retry_after_s is not None


class FleetHandles(HandleModels):
    """A ``FleetModel`` deployment: each member's batch is one handle call carrying the
    member's name as ``multiplexed_model_id`` (Serve routes it to a replica that holds
    the model). Membership is the fleet's directory, looked up on a model's first
    request, so a model dropped into it is served without a deploy."""

    def __init__(self, fleet: str, handle: DeploymentHandle, directory: str,
                 retry_after_s: Callable[[], float | None] = lambda: None) -> None:
        # The members' handles are HandleModels's handles by model name.
        super().__init__({name: handle.options(multiplexed_model_id=name)
                          for name in fleet_members(Path(directory))}, retry_after_s)
        self.fleet = fleet
        self._base = handle
        self._directory = Path(directory)

    def owns(self, name: str) -> bool:
        """Whether ``name`` is (now) a member: known, or its directory exists."""
        if name in self._models:
            return True
        if not holds(self._directory, name):
            return False
        self._models[name] = self._base.options(multiplexed_model_id=name)
        self._names = sorted(self._models)
        return True

    def _handle(self, name: str) -> DeploymentHandle:
        if not self.owns(name):
            raise ModelNotFound(f"model {name!r} is not in fleet {self.fleet!r}")
        return self._models[name]

    async def status(self, name: str) -> ModelStatus:
        # Any replica answers it from the repository: no routing to the model's holder.
        result: ModelStatus = await call(f"model {name!r}", self._base.status.remote(name),
                                         "model")
        return result

    async def warm_up(self) -> None:
        """An empty batch (it names no model, so none loads): sets up the handle's path."""
        await call(f"fleet {self.fleet!r}", self._base.infer_many.remote([]), "model")


class HandleFeatures:
    """The ``FeatureService`` deployment: one handle call per batch of lookups."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def warm_up(self) -> None:
        """A real (empty) lookup: sets up this method's path end to end."""
        await call("the feature store", self._handle.lookup_many.remote([]), "features")

    async def lookup_many(self, lookups: list[Lookup],
                          traces: list[dict[str, str] | None]) -> Sequence[FeatureRows | KeelError]:
        with tracing.span("keel.features.lookup",
                          {"keel.lookups": len(lookups),
                           "keel.entities": sum(len(e) for e, _ in lookups)},
                          kind=SpanKind.CLIENT):
            rows: list[FeatureRows | KeelError] = await call(
                "the feature store", self._handle.lookup_many.remote(lookups, traces),
                "features")
        return [r.at("features") if isinstance(r, KeelError) and r.status >= 500 else r
                for r in rows]


class HandleLLM:
    """Calls the ``LLMGateway`` deployment (streams through a streaming handle)."""

    WHAT = "the LLM gateway"

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._streaming = handle.options(stream=True)

    async def complete(self, chat: ChatCall) -> ChatAnswer:
        answer: ChatAnswer = await call(self.WHAT, self._handle.complete.remote(chat), "llm")
        return answer

    async def stream(self, chat: ChatCall) -> AsyncIterator[str]:
        try:
            events = cast(DeploymentResponseGenerator, self._streaming.stream.remote(chat))
            async for item in events:
                yield item
        except Exception as exc:
            raise as_keel_error(self.WHAT, exc, "llm") from exc

    async def usage(self) -> dict[str, Any]:
        summary: dict[str, Any] = await call(self.WHAT, self._handle.usage.remote(), "llm")
        return summary


async def call(what: str, response: Any, stage: str) -> Any:
    """Await a handle call; a Ray error becomes the Keel error the client should see.

    If the awaiting task is cancelled (every request of a batch gave up: time budgets
    ran out, clients went away), the call is cancelled too: a call still queued for a
    batch leaves it, one running has its own downstream calls cancelled by Serve.
    ``response`` is a ``DeploymentResponse`` (Ray types ``.remote()`` as a union with the
    streaming generator).
    """
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
    except TimeoutError:
        raise
    except Exception as exc:
        raise as_keel_error(what, exc, stage) from exc


def as_keel_error(what: str, exc: Exception, stage: str) -> KeelError:
    """The Keel error for a failed handle call; server-side failures name ``stage``."""
    error = keel_error_of(what, exc)
    return error.at(stage) if error.status >= 500 else error


def keel_error_of(what: str, exc: Exception) -> KeelError:
    """Ray's failure ``exc`` of a call to ``what`` as the Keel error a client sees."""
    if isinstance(exc, KeelError) and not isinstance(exc, RayTaskError):
        return exc
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, KeelError):
            return cause
        log.error("%s failed: %s", what, exc)
        return DependencyUnavailable(f"{what} failed: {type(cause).__name__}")
    if isinstance(exc, BackPressureError):
        return Overloaded(f"{what} is overloaded; retry shortly")
    if isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError
                  | DeploymentUnavailableError | ReplicaUnavailableError):
        return DependencyUnavailable(f"{what} is unavailable: {type(exc).__name__}",
                                     retry_after_s=1)
    log.error("%s call failed: %r", what, exc)
    return DependencyUnavailable(f"{what} call failed: {type(exc).__name__}")
