"""``StallAwareRouter``: Serve's power-of-two-choices router that leaves out replicas
which stopped answering (``core.StallWatch`` decides which).

Serve builds one router per deployment handle, in the caller's process (the ingress
replicas), from the callee deployment's ``request_router_config``; ``graph/app.py`` sets
it on every model, fleet and feature deployment. The router learns that a replica is
alive from what Serve already tells it: the replica's answer to each call (it accepts
or refuses it, with its queue length) and queue-length probes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from deployments.stall.core import PROBE_EVERY_S, STALL_AFTER_S, StallWatch


class StallAwareRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's default router (whose class Ray exports only from a private module: Ray
    2.60 publishes the mixins, not the composed router) plus ``StallWatch``."""

    def initialize_state(self, stall_after_s: float = STALL_AFTER_S,
                         probe_every_s: float = PROBE_EVERY_S, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        self._watch = StallWatch(stall_after_s, probe_every_s,
                                 what=f"deployment {self._deployment_id.name!r}")

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        for replica in self._replicas_list:
            if self._watch.due_for_probe(replica.replica_id):
                self._event_loop.create_task(self._probe(replica))
        return self._watch.choose(ranks, self._replicas_list, key=lambda r: r.replica_id)

    async def _probe(self, replica: RunningReplica) -> None:
        deadline = self._watch.probe_every_s
        with contextlib.suppress(Exception):
            await asyncio.wait_for(replica.get_queue_len(deadline_s=deadline), deadline)
            self._watch.answered(replica.replica_id)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self._watch.sent(replica_id)

    def on_new_queue_len_info(self, replica_id: ReplicaID, num_ongoing_requests: int) -> None:
        super().on_new_queue_len_info(replica_id, num_ongoing_requests)
        self._watch.answered(replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._watch.forget(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._watch.keep({r.replica_id for r in replicas})


def stall_aware(stall_after_s: float = STALL_AFTER_S,
                probe_every_s: float = PROBE_EVERY_S) -> RequestRouterConfig:
    """The ``request_router_config`` of a deployment whose callers route around its
    stalled replicas."""
    # Ray types every keyword of RequestRouterConfig's __init__ as a dict.
    options: dict[str, Any] = {
        "request_router_class": StallAwareRouter,
        "request_router_kwargs": {"stall_after_s": stall_after_s,
                                  "probe_every_s": probe_every_s}}
    return RequestRouterConfig(**options)
