"""Hedged calls (deployments/ingress/pool/hedge.py) on real asyncio tasks: attempts that hang,
fail or answer, and what is cancelled."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.errors import DependencyUnavailable, InvalidInput
from deployments.ingress.pool.hedge import first_answer


def lost(error: BaseException) -> bool:
    return isinstance(error, DependencyUnavailable) and error.retry_after_s is not None


class Replicas:
    """Each attempt behaves as the next entry says: "hang", "lost", "bad" or a value."""

    def __init__(self, *behaviours: str) -> None:
        self.behaviours = list(behaviours)
        self.started: list[float] = []
        self.cancelled = 0
        self.clock = time.monotonic()

    async def send(self) -> str:
        behaviour = self.behaviours[len(self.started)]
        self.started.append(round(time.monotonic() - self.clock, 2))
        try:
            if behaviour == "hang":
                await asyncio.sleep(3600)
            await asyncio.sleep(0.01)
            if behaviour == "lost":
                raise DependencyUnavailable("replica died", retry_after_s=1)
            if behaviour == "bad":
                raise InvalidInput("input 'x': bad")
            return behaviour
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def test_an_answer_in_time_is_one_attempt() -> None:
    replicas = Replicas("ok")
    assert await first_answer(replicas.send, 0.2, lost=lost) == "ok"
    assert len(replicas.started) == 1


async def test_hung_attempts_are_joined_by_new_ones_and_cancelled_when_one_answers() -> None:
    replicas = Replicas("hang", "hang", "ok")
    assert await first_answer(replicas.send, 0.1, lost=lost) == "ok"
    assert len(replicas.started) == 3
    assert 0.09 <= replicas.started[1] < 0.3 and 0.18 <= replicas.started[2] < 0.5
    await asyncio.sleep(0)
    assert replicas.cancelled == 2  # the hung attempts do not outlive the call


async def test_by_default_a_fourth_attempt_outlasts_three_hung_ones() -> None:
    """Serve may route the first attempts of a hang to the hung replica (its cached queue
    length is trusted for 10 s): the default gives a fourth attempt its chance."""
    replicas = Replicas("hang", "hang", "hang", "ok")
    assert await first_answer(replicas.send, 0.05, lost=lost) == "ok"
    assert len(replicas.started) == 4


async def test_a_lost_replica_is_retried_at_once() -> None:
    replicas = Replicas("lost", "ok")
    started = time.monotonic()
    assert await first_answer(replicas.send, 10.0, lost=lost) == "ok"
    assert time.monotonic() - started < 1.0  # not after retry_after_s


async def test_a_failure_inside_the_model_is_not_retried() -> None:
    replicas = Replicas("bad", "ok")
    with pytest.raises(InvalidInput):
        await first_answer(replicas.send, 0.1, lost=lost)
    assert len(replicas.started) == 1


async def test_attempts_are_bounded_and_the_last_loss_is_raised() -> None:
    replicas = Replicas("lost", "lost", "lost", "ok")
    with pytest.raises(DependencyUnavailable, match="replica died"):
        await first_answer(replicas.send, 0.1, lost=lost, max_attempts=3)
    assert len(replicas.started) == 3
    hung = Replicas("hang", "hang", "hang", "ok")
    with pytest.raises(TimeoutError):  # the caller's budget bounds the last attempt
        await asyncio.wait_for(first_answer(hung.send, 0.05, lost=lost, max_attempts=3), 0.4)
    assert len(hung.started) == 3
    await asyncio.sleep(0)
    assert hung.cancelled == 3


async def test_no_retry_after_means_only_lost_replicas_are_retried() -> None:
    replicas = Replicas("hang", "ok")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(first_answer(replicas.send, None, lost=lost), 0.3)
    assert len(replicas.started) == 1
    assert await first_answer(Replicas("lost", "ok").send, None, lost=lost) == "ok"


async def test_cancelling_the_caller_cancels_every_attempt() -> None:
    replicas = Replicas("hang", "hang", "hang")
    task = asyncio.ensure_future(first_answer(replicas.send, 0.05, lost=lost, max_attempts=3))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert replicas.cancelled == 3
