"""StallWatch: which replicas the router leaves out (no Ray)."""

from __future__ import annotations

import logging

import pytest

from deployments.stall.core import StallWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def watch(clock: Clock) -> StallWatch:
    return StallWatch(stall_after_s=1.0, probe_every_s=0.5, what="deployment 'm'",
                      clock=clock)


def test_a_replica_with_a_call_unanswered_past_the_limit_is_stalled(
        watch: StallWatch, clock: Clock) -> None:
    assert not watch.stalled("a")  # never called
    watch.sent("a")
    clock.now += 0.9
    watch.sent("a")  # a second call does not restart the clock
    assert not watch.stalled("a")
    clock.now += 0.1
    assert watch.stalled("a")
    assert watch.stalls == 1
    assert watch.stalled("a") and watch.stalls == 1  # counted once per stall


def test_any_answer_clears_a_replica(watch: StallWatch, clock: Clock,
                                     caplog: pytest.LogCaptureFixture) -> None:
    watch.sent("a")
    clock.now += 0.5
    watch.answered("a")  # e.g. it accepted the call: its event loop runs
    clock.now += 5
    assert not watch.stalled("a")
    watch.sent("a")
    clock.now += 2
    with caplog.at_level(logging.WARNING):
        assert watch.stalled("a")
        watch.answered("a")
    assert not watch.stalled("a")
    messages = [r.getMessage() for r in caplog.records]
    assert any("has not answered a call for 2.0 s" in m and "'m'" in m for m in messages)
    assert any("answers again" in m for m in messages)
    assert watch.stalls == 1


def test_choose_leaves_stalled_replicas_out(watch: StallWatch, clock: Clock) -> None:
    watch.sent("a")
    clock.now += 1.5
    key = str
    assert watch.choose([["a", "b"]], ["a", "b", "c"], key) == [["b"]]
    assert watch.choose([["b", "c"], ["a"]], ["a", "b", "c"], key) == [["b", "c"]]
    # Serve chose only the stalled one: two others that answer instead.
    assert sorted(watch.choose([["a"]], ["a", "b", "c"], key)[0]) == ["b", "c"]
    assert watch.choose([["a"]], ["a", "b"], key) == [["b"]]
    assert watch.choose([], ["a", "b"], key) == []  # nothing to route to yet: unchanged


def test_when_every_replica_is_stalled_the_choice_stands(watch: StallWatch,
                                                          clock: Clock) -> None:
    watch.sent("a")
    watch.sent("b")
    clock.now += 1.5
    assert watch.choose([["a", "b"]], ["a", "b"], str) == [["a", "b"]]
    assert watch.choose([["a"]], ["a"], str) == [["a"]]


def test_a_stalled_replica_is_probed_at_most_once_per_interval(watch: StallWatch,
                                                                clock: Clock) -> None:
    assert not watch.due_for_probe("a")  # not stalled: no probe
    watch.sent("a")
    clock.now += 1.0
    assert watch.due_for_probe("a")
    assert not watch.due_for_probe("a")
    clock.now += 0.49
    assert not watch.due_for_probe("a")
    clock.now += 0.01
    assert watch.due_for_probe("a")
    watch.answered("a")  # the probe answered: back in the rotation
    assert not watch.stalled("a") and not watch.due_for_probe("a")


def test_replicas_that_left_are_forgotten(watch: StallWatch, clock: Clock) -> None:
    for replica in ("a", "b", "c"):
        watch.sent(replica)
    clock.now += 2
    assert watch.due_for_probe("a") and watch.stalled("b") and watch.stalled("c")
    watch.keep({"b", "c"})
    watch.forget("c")
    assert not watch.stalled("a") and not watch.stalled("c") and watch.stalled("b")
    watch.sent("a")  # "a" again (same id): a fresh clock
    assert not watch.stalled("a")


@pytest.mark.parametrize("bad", [{"stall_after_s": 0}, {"probe_every_s": -1}])
def test_limits_must_be_positive(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        StallWatch(**bad)
