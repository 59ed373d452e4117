"""Which replicas have stopped answering (no Ray here).

Serve's router sends a call to the replica with the shorter known queue of two. A
replica that hangs (a stopped process, a blocked event loop, a wedged node) keeps its
last known queue length, and each call sent to it refreshes that entry, so it goes on
receiving a share of the calls until its health checks fail, which is ~45 s with the
shipped settings. Each such call waits for the ingress's hedge
(``model_call_retry_s``), and a hedged attempt can be routed to the same replica.

``StallWatch`` keeps, per replica, the time of the first call sent to it since it last
answered anything (a call's acceptance or a queue-length probe). A replica with a call
unanswered for ``stall_after_s`` is *stalled*: ``choose`` leaves it out of the
candidates while any other replica answers, and it is probed every ``probe_every_s``
until it answers again (a replica only slowed down comes back at its first answer).
With no replica left that answers, the candidates stay as they were: a stalled replica
is still better than none.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")

#: A call a live replica has not even accepted after this long is a stall. A replica
#: accepts (or refuses) a call as soon as its event loop sees it, before any batching, so
#: a busy replica accepts in milliseconds; the model's own p95 target is 50 ms.
STALL_AFTER_S = 1.0
#: How often a stalled replica is asked for its queue length (one probe at a time).
PROBE_EVERY_S = 0.5


@dataclass
class StallWatch:
    stall_after_s: float = STALL_AFTER_S
    probe_every_s: float = PROBE_EVERY_S
    what: str = "a deployment"
    clock: Callable[[], float] = time.monotonic
    #: replica -> when the first call since its last answer was sent to it
    _waiting_since: dict[Hashable, float] = field(default_factory=dict)
    _probed_at: dict[Hashable, float] = field(default_factory=dict)
    _reported: set[Hashable] = field(default_factory=set)
    #: How many times a replica was found stalled (routed around), for stats and tests.
    stalls: int = 0

    def __post_init__(self) -> None:
        if self.stall_after_s <= 0 or self.probe_every_s <= 0:
            raise ValueError(f"stall_after_s and probe_every_s must be > 0, got "
                             f"{self.stall_after_s} and {self.probe_every_s}")

    def sent(self, replica: Hashable) -> None:
        """A call went to ``replica``: the clock starts unless one already runs."""
        self._waiting_since.setdefault(replica, self.clock())

    def answered(self, replica: Hashable) -> None:
        """``replica`` answered something: it is alive."""
        self._waiting_since.pop(replica, None)
        self._probed_at.pop(replica, None)
        if replica in self._reported:
            self._reported.discard(replica)
            log.warning("%s: replica %s answers again", self.what, replica)

    def stalled(self, replica: Hashable) -> bool:
        since = self._waiting_since.get(replica)
        if since is None or self.clock() - since < self.stall_after_s:
            return False
        if replica not in self._reported:
            self._reported.add(replica)
            self.stalls += 1
            log.warning("%s: replica %s has not answered a call for %.1f s; routing "
                        "around it until it answers", self.what, replica,
                        self.clock() - since)
        return True

    def due_for_probe(self, replica: Hashable) -> bool:
        """Whether to probe the stalled ``replica`` now (at most once per
        ``probe_every_s``; the caller probes and reports an answer as ``answered``)."""
        if not self.stalled(replica):
            return False
        now = self.clock()
        if now - self._probed_at.get(replica, -float("inf")) < self.probe_every_s:
            return False
        self._probed_at[replica] = now
        return True

    def keep(self, replicas: set[Hashable]) -> None:
        """Forget every replica not in ``replicas`` (gone from the deployment)."""
        for book in (self._waiting_since, self._probed_at):
            for replica in [r for r in book if r not in replicas]:
                del book[replica]
        self._reported &= replicas

    def forget(self, replica: Hashable) -> None:
        """``replica`` died."""
        self._waiting_since.pop(replica, None)
        self._probed_at.pop(replica, None)
        self._reported.discard(replica)

    def choose(self, ranks: Sequence[Sequence[R]], replicas: Sequence[R],
               key: Callable[[R], Hashable]) -> list[list[R]]:
        """``ranks`` (the router's candidates, most preferred first) without stalled
        replicas. When that leaves none, two of the other replicas that answer; when
        every replica is stalled, ``ranks`` unchanged."""
        live = [[r for r in rank if not self.stalled(key(r))] for rank in ranks]
        live = [rank for rank in live if rank]
        if live or not ranks:
            return live
        others = [r for r in replicas if not self.stalled(key(r))]
        if not others:
            return [list(rank) for rank in ranks]
        return [random.sample(others, min(2, len(others)))]
