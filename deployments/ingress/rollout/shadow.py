"""Shadow (mirror) traffic: a copy of live requests to a version that does not answer them.

No Ray here. Once a request's answer is computed, ``ShadowMirror.offer`` puts a copy of
its inputs and live outputs on a bounded queue (full: the copy is dropped and counted).
One worker task takes what is waiting, sends each model's copies in one call kept apart
from live traffic (``ModelPool.infer_aside``: never in a live batch, never on the event
loop), and compares the shadow's outputs with the live ones row by row: the absolute
score difference and whether the decision flipped. A shadow's answer is never returned
and never cached; a slow or failing shadow only fills the queue and is counted.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from deployments.background import AfterAnswer
from deployments.contracts import InferCall, InferResult, Shadow
from deployments.errors import KeelError
from deployments.repository import ModelSpec

log = logging.getLogger(__name__)

#: Why a copy was not compared: the queue was full, or the shadow call failed (an error
#: answer, a timeout, outputs that cannot be compared with the live ones).
DROP_REASONS = ("queue_full", "failed")


@dataclass
class ShadowCopy:
    """One live request's rows, as answered, waiting for the shadow version."""

    model: str
    version: str
    shadow_version: str
    live_spec: ModelSpec
    inputs: dict[str, np.ndarray]
    live: dict[str, np.ndarray]


class ShadowObserver(Protocol):
    """Told every comparison (per row) and every copy dropped (metrics)."""

    def shadow_compared(self, model: str, version: str, shadow_version: str,
                        differences: np.ndarray, flips: int) -> None: ...

    def shadow_dropped(self, model: str, version: str, shadow_version: str,
                       reason: str) -> None: ...


@dataclass
class Comparison:
    """Live against shadow for one model and version pair, since this replica started."""

    requests: int = 0
    rows: int = 0
    flips: int = 0
    difference_sum: float = 0.0
    difference_max: float = 0.0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def add(self, differences: np.ndarray, flips: int) -> None:
        self.requests += 1
        self.rows += len(differences)
        self.flips += flips
        if len(differences):
            self.difference_sum += float(differences.sum())
            self.difference_max = max(self.difference_max, float(differences.max()))

    def snapshot(self) -> dict[str, Any]:
        rows = self.rows
        return {"requests_compared": self.requests, "rows_compared": rows,
                "decision_flips": self.flips,
                "flip_ratio": self.flips / rows if rows else None,
                "mean_abs_difference": self.difference_sum / rows if rows else None,
                "max_abs_difference": self.difference_max if rows else None,
                "dropped": dict(self.dropped)}


def compare(live_spec: ModelSpec, shadow_spec: ModelSpec, live: dict[str, np.ndarray],
            shadow: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """Per row, |live - shadow| and the number of rows whose decision flipped.

    With a decision rule on both versions, the rule's score and threshold; otherwise the
    largest difference over the numeric outputs both answered, and a flip is a row whose
    arg-max over the first such output's classes differs. ``ValueError`` when nothing can
    be compared."""
    live_rule, shadow_rule = live_spec.decision, shadow_spec.decision
    if live_rule is not None and shadow_rule is not None and live_rule.output in live \
            and shadow_rule.output in shadow:
        a = _column(live[live_rule.output], live_rule.index)
        b = _column(shadow[shadow_rule.output], shadow_rule.index)
        if a.shape != b.shape:
            raise ValueError(f"the shadow answered {b.shape[0]} scores for {a.shape[0]} rows")
        flipped = (a >= live_rule.threshold) != (b >= shadow_rule.threshold)
        return np.abs(a - b), int(np.count_nonzero(flipped))
    common = [name for name, value in live.items()
              if name in shadow and value.shape == shadow[name].shape and value.ndim >= 1
              and value.dtype.kind in "fiub" and shadow[name].dtype.kind in "fiub"]
    if not common:
        raise ValueError(f"no numeric output answered by both (live {sorted(live)}, "
                         f"shadow {sorted(shadow)})")
    rows = live[common[0]].shape[0]
    differences = np.max(np.stack([
        np.abs(live[name].reshape(rows, -1).astype(np.float64)
               - shadow[name].reshape(rows, -1).astype(np.float64)).max(axis=1)
        for name in common]), axis=0)
    first_live, first_shadow = live[common[0]], shadow[common[0]]
    flips = 0
    if first_live.ndim == 2 and first_live.shape[1] > 1:
        flips = int(np.count_nonzero(first_live.argmax(axis=1) != first_shadow.argmax(axis=1)))
    return differences, flips


def _column(values: np.ndarray, index: int) -> np.ndarray:
    return values.reshape(len(values), -1)[:, index].astype(np.float64)


SendAside = Callable[[str, list[InferCall]], Awaitable[Sequence[InferResult | KeelError]]]
SpecOf = Callable[[str, str], Awaitable[ModelSpec]]


class ShadowMirror:
    """The bounded queue of shadow copies and the worker that sends and compares them.

    ``capacity()`` (the Ingress's ``shadow_queue``) bounds the copies waiting,
    ``batch_size()`` the copies one call carries, ``timeout_s()`` each call.
    """

    def __init__(self, send: SendAside, spec_of: SpecOf, *, capacity: Callable[[], int],
                 batch_size: Callable[[], int], timeout_s: Callable[[], float],
                 observer: ShadowObserver | None = None,
                 rng: random.Random | None = None,
                 queue: AfterAnswer | None = None) -> None:
        self._send = send
        self._spec_of = spec_of
        self._timeout_s = timeout_s
        self.observer = observer
        self._rng = rng or random.Random()
        # The process's after-the-answer queue, lane "shadow_copy".
        self._queue = (queue or AfterAnswer()).lane("shadow_copy", self._handle, batch_size,
                                                    limit=capacity)
        self.comparisons: dict[tuple[str, str, str], Comparison] = {}

    def offer(self, model: str, shadow: Shadow | None, version: str, live_spec: ModelSpec,
              inputs: dict[str, np.ndarray], live: dict[str, np.ndarray]) -> bool:
        """Queue a copy of one answered request for ``shadow``'s version (sampled by its
        ``fraction``); False when none is queued. Never raises, never waits."""
        if shadow is None or shadow.version == version or not live:
            return False
        if shadow.fraction < 1.0 and self._rng.random() >= shadow.fraction:
            return False
        copy = ShadowCopy(model, version, shadow.version, live_spec, inputs, live)
        if not self._queue.offer(copy):
            self._dropped(model, version, shadow.version, "queue_full")
            return False
        return True

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def settled(self, timeout_s: float = 30.0) -> None:
        """Wait until every copy queued so far is compared or dropped (tests, shutdown)."""
        await self._queue.settled(timeout_s)

    def state(self, model: str) -> list[dict[str, Any]]:
        """This replica's comparisons for ``model``, one per live and shadow version pair."""
        return [{"version": version, "shadow_version": shadow, **comparison.snapshot()}
                for (name, version, shadow), comparison in sorted(self.comparisons.items())
                if name == model]

    def _comparison(self, model: str, version: str, shadow_version: str) -> Comparison:
        key = (model, version, shadow_version)
        comparison = self.comparisons.get(key)
        if comparison is None:
            comparison = self.comparisons[key] = Comparison()
        return comparison

    def _dropped(self, model: str, version: str, shadow_version: str, reason: str) -> None:
        self._comparison(model, version, shadow_version).dropped[reason] += 1
        if self.observer is not None:
            self.observer.shadow_dropped(model, version, shadow_version, reason)

    async def _handle(self, taken: list[ShadowCopy]) -> None:
        groups: dict[tuple[str, str], list[ShadowCopy]] = {}
        for copy in taken:
            groups.setdefault((copy.model, copy.shadow_version), []).append(copy)
        for (model, shadow_version), copies in groups.items():
            try:
                await self._mirror(model, shadow_version, copies)
            except Exception as exc:  # a shadow never fails anything: counted, logged
                log.warning("shadow %s version %s: %d copies failed: %r", model,
                            shadow_version, len(copies), exc)
                for copy in copies:
                    self._dropped(model, copy.version, shadow_version, "failed")

    async def _mirror(self, model: str, shadow_version: str, copies: list[ShadowCopy]) -> None:
        calls = [InferCall(inputs=c.inputs, version=shadow_version) for c in copies]
        answers = await asyncio.wait_for(self._send(model, calls), self._timeout_s())
        shadow_spec = await self._spec_of(model, shadow_version)
        for copy, answer in zip(copies, answers, strict=True):
            if isinstance(answer, BaseException):
                self._dropped(model, copy.version, shadow_version, "failed")
                continue
            try:
                differences, flips = compare(copy.live_spec, shadow_spec, copy.live,
                                             answer.outputs)
            except ValueError as exc:
                log.debug("shadow %s version %s: not comparable: %s", model, shadow_version,
                          exc)
                self._dropped(model, copy.version, shadow_version, "failed")
                continue
            self._comparison(model, copy.version, shadow_version).add(differences, flips)
            if self.observer is not None:
                self.observer.shadow_compared(model, copy.version, shadow_version,
                                              differences, flips)
