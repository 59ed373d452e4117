"""The ingress's read-through copy of entity feature rows, bounded by staleness.

No Ray here. ``/v1/decide`` asks ``FeatureRowCache.split`` which of a request's
entities it already holds (fetched at most ``max_staleness_s`` ago, for exactly the
same feature list); only the rest go to the FeatureService, and what comes back is
kept. A repeated entity within the bound costs no hop at all. ``max_staleness_s: 0``
turns it off: every lookup goes to the store, as Feast itself would answer.

What a user gives up: a value written to the online store (``feast materialize``,
a push) is seen by ``/v1/decide`` up to ``max_staleness_s`` later. The age Keel
reports (``keel_feature_age_seconds``) is the event time of the row served, so a
row held here keeps ageing in that gauge.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deployments.features.core import FeatureRows


class FeatureCacheConfig(BaseModel):
    """Live knobs of the ingress's feature-row cache (``user_config.features``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: How old (since it was fetched from the online store) a row may be when served;
    #: 0 turns the cache off.
    max_staleness_s: float = Field(default=5.0, ge=0, le=3600)
    #: Most (entity, feature list) rows kept per ingress replica (LRU beyond).
    max_entries: int = Field(default=100_000, ge=0, le=10_000_000)


@dataclass(frozen=True)
class _Row:
    values: np.ndarray  # float32 [n_features]
    stamps: tuple[tuple[str, float], ...]  # (feature view, event time)
    fetched: float  # monotonic


def entity_key(entity: dict[str, Any], features: tuple[str, ...]) -> Hashable | None:
    """A hashable key for one entity and feature list; ``None`` when the entity's values
    cannot be keyed (the store then judges the entity)."""
    try:
        key = (features, tuple(sorted(entity.items())))
        hash(key)
    except TypeError:
        return None
    return key


class FeatureRowCache:
    """Feature rows per (entity, feature list), each served for ``max_staleness_s``."""

    def __init__(self, config: FeatureCacheConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or FeatureCacheConfig()
        self._clock = clock
        self._rows: OrderedDict[Hashable, _Row] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def enabled(self) -> bool:
        return self.config.max_staleness_s > 0 and self.config.max_entries > 0

    def reconfigure(self, config: FeatureCacheConfig) -> None:
        self.config = config
        if not self.enabled:
            self._rows.clear()
        self._trim()

    def split(self, entities: list[dict[str, Any]], features: list[str]
              ) -> tuple[list[_Row | None], list[int]]:
        """Per entity: its fresh row or ``None``; and the indices to fetch."""
        if not self.enabled:
            return [None] * len(entities), list(range(len(entities)))
        now = self._clock()
        oldest = now - self.config.max_staleness_s
        names = tuple(features)
        found: list[_Row | None] = []
        missing: list[int] = []
        for i, entity in enumerate(entities):
            key = entity_key(entity, names)
            row = self._rows.get(key) if key is not None else None
            if row is not None and row.fetched >= oldest:
                self._rows.move_to_end(key)
                found.append(row)
            else:
                found.append(None)
                missing.append(i)
        self.hits += len(entities) - len(missing)
        self.misses += len(missing)
        return found, missing

    def keep(self, entities: list[dict[str, Any]], features: list[str],
             rows: FeatureRows) -> None:
        """Remember freshly fetched rows (in ``entities`` order)."""
        if not self.enabled:
            return
        now = self._clock()
        names = tuple(features)
        views = list(rows.event_timestamps.items())
        for i, entity in enumerate(entities):
            key = entity_key(entity, names)
            if key is None:
                continue
            stamps = tuple((view, float(ts[i])) for view, ts in views)
            self._rows[key] = _Row(rows.values[i].copy(), stamps, now)
            self._rows.move_to_end(key)
        self._trim()

    def _trim(self) -> None:
        while len(self._rows) > self.config.max_entries:
            self._rows.popitem(last=False)


def assemble(found: list[_Row | None], fetched: FeatureRows | None, missing: list[int],
             n_features: int) -> FeatureRows:
    """One ``FeatureRows`` in request order from cached rows and the fetched ones."""
    values = np.empty((len(found), n_features), dtype=np.float32)
    stamps: dict[str, list[float]] = {}
    position = {index: j for j, index in enumerate(missing)}
    for i, row in enumerate(found):
        if row is not None:
            values[i] = row.values
            for view, ts in row.stamps:
                stamps.setdefault(view, []).append(ts)
        else:
            assert fetched is not None
            j = position[i]
            values[i] = fetched.values[j]
            for view, ts_list in fetched.event_timestamps.items():
                stamps.setdefault(view, []).append(float(ts_list[j]))
    return FeatureRows(values, stamps)
