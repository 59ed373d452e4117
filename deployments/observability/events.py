"""``ServingObserver``: the one observer of what the ingress serves. No Ray here.

The transports, the data plane, the model pool and the rollout features each tell the
one observer they are given what happened; every method here does nothing, and an
observer (the Ingress's Ray metrics, the SLO observer, a test's recorder) overrides
the ones it records. Nothing is probed with ``hasattr``: an event nobody records costs
one empty call. An observer must not raise into a request (the transports guard
``request``; the others are plain counters).
"""

from __future__ import annotations

import numpy as np


class ServingObserver:
    """Told about requests, model calls and batches, feature ages, shadow comparisons,
    payload records and input drift."""

    def request(self, http_route: str, model: str, status: int, latency_ms: float,
                version: str = "") -> None:
        """An answered request (REST or gRPC), by route, model and HTTP status."""

    def model_call(self, model: str, latency_ms: float, ok: bool) -> None:
        """One call to a model (in the ingress or a handle call), and whether it answered."""

    def model_batch(self, model: str, size: int) -> None:
        """The number of requests one coalesced model call carried."""

    def feature_ages(self, ages: dict[str, float]) -> None:
        """The event-time age of the feature rows a decision used, per feature view."""

    def shadow_compared(self, model: str, version: str, shadow_version: str,
                        differences: np.ndarray, flips: int) -> None:
        """A shadow copy's answer against the live one, per row."""

    def shadow_dropped(self, model: str, version: str, shadow_version: str,
                       reason: str) -> None:
        """A shadow copy not compared, and why."""

    def payloads_logged(self, count: int) -> None:
        """Payload records appended to the stream."""

    def payloads_dropped(self, reason: str, count: int) -> None:
        """Payload records dropped, and why."""

    def feature_drift(self, model: str, version: str, feature: str, value: float) -> None:
        """A recomputed drift index of one input feature."""
