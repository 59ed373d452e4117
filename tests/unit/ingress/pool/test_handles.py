"""Ray's failures of a handle call, as the Keel errors a client sees (no Ray started:
the exceptions are constructed as Ray raises them)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from deployments.errors import (
    DependencyUnavailable,
    EntityNotFound,
    InvalidInput,
    KeelError,
    Overloaded,
)
from deployments.ingress.pool.handles import as_keel_error, call


def _task_error(cause: Exception) -> RayTaskError:
    return RayTaskError("infer_many", "Traceback (most recent call last): ...", cause)


@pytest.mark.parametrize(("raised", "kind", "status", "words"), [
    # A Keel error raised in the replica crosses intact: its status, its message.
    (_task_error(InvalidInput("input 'features': expected FP32")), InvalidInput, 400,
     "'features': expected FP32"),
    (_task_error(EntityNotFound("entities[0]: symbol 'X' is not in the feature store")),
     EntityNotFound, 404, "'X'"),
    # Anything else that failed in the replica is a 503 naming the callee, never a trace.
    (_task_error(ZeroDivisionError("division by zero")), DependencyUnavailable, 503,
     "model 'm' failed: ZeroDivisionError"),
    (BackPressureError(num_queued_requests=10, max_queued_requests=10), Overloaded, 503,
     "overloaded"),
    (DeploymentUnavailableError(DeploymentID(name="m", app_name="keel")),
     DependencyUnavailable, 503, "unavailable: DeploymentUnavailableError"),
    (ReplicaUnavailableError("replica-1"), DependencyUnavailable, 503,
     "unavailable: ReplicaUnavailableError"),
    (ActorDiedError(), DependencyUnavailable, 503, "unavailable: ActorDiedError"),
    (ActorUnavailableError("gone", None), DependencyUnavailable, 503,
     "unavailable: ActorUnavailableError"),
    (RuntimeError("grpc: socket closed"), DependencyUnavailable, 503,
     "call failed: RuntimeError"),
])
def test_ray_failures_become_keel_errors(raised: Exception, kind: type[KeelError], status: int,
                                         words: str) -> None:
    error = as_keel_error("model 'm'", raised, "model")
    assert isinstance(error, kind) and error.status == status
    assert words in error.message
    # Server-side failures name the stage (answered as {"error", "stage"}); 4xx do not.
    assert error.stage == ("model" if status >= 500 else None)
    if isinstance(raised, BackPressureError | DeploymentUnavailableError | ReplicaUnavailableError
                  | ActorDiedError | ActorUnavailableError):
        assert error.retry_after_s == 1


class _Response:
    """What ``call`` needs of a DeploymentResponse: awaitable, cancellable."""

    def __init__(self, outcome: Any, delay_s: float = 0.0) -> None:
        self.outcome = outcome
        self.delay_s = delay_s
        self.cancelled = False

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        await asyncio.sleep(self.delay_s)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


async def test_call_answers_maps_and_cancels_the_call_it_abandons() -> None:
    assert await call("m", _Response([1, 2]), "model") == [1, 2]
    with pytest.raises(Overloaded):
        await call("m", _Response(BackPressureError(num_queued_requests=1,
                                                    max_queued_requests=1)), "model")
    slow = _Response("late", delay_s=5)
    task = asyncio.create_task(call("m", slow, "model"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slow.cancelled, "a call nobody waits for must be cancelled downstream"
