"""Input drift: live inputs against the training distribution, per feature. No Ray here.

The payload log's sample of answered requests (``payloads.rate``) also feeds this
monitor: per model version, the last ``drift_window`` logged rows of each input that
``model.yaml`` gives a ``reference`` for (``keel prepare`` writes training deciles).
Every ``every`` new rows, each column's Population Stability Index against its reference
is recomputed and reported (``keel_feature_drift_psi``):

    PSI = sum over bins of (live share - training share) * ln(live share / training share)

with both shares floored at ``1e-4`` (an empty bin would make it infinite). By the usual
reading, below 0.1 is no shift, 0.1-0.25 a moderate one and above 0.25 a large one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from deployments.repository import ColumnBins, ModelSpec

#: Shares below this count as this (an empty bin would make the index infinite).
FLOOR = 1e-4


def psi(reference: ColumnBins, values: np.ndarray) -> float:
    """The Population Stability Index of ``values`` against ``reference`` (NaN rows
    are left out; no rows: 0)."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return 0.0
    counts = np.bincount(np.searchsorted(np.asarray(reference.edges), values, side="right"),
                         minlength=len(reference.shares))
    live = np.maximum(counts / values.size, FLOOR)
    expected = np.maximum(np.asarray(reference.shares), FLOOR)
    return float(np.sum((live - expected) * np.log(live / expected)))


class DriftObserver(Protocol):
    """Told each recomputed index (metrics)."""

    def feature_drift(self, model: str, version: str, feature: str, value: float) -> None: ...


@dataclass
class _Window:
    """The last ``capacity`` rows of one model version's referenced columns."""

    columns: list[str]
    indices: list[int]
    capacity: int
    rows: np.ndarray = field(init=False)
    size: int = 0
    position: int = 0
    since: int = 0

    def __post_init__(self) -> None:
        self.rows = np.zeros((self.capacity, len(self.columns)), np.float64)

    def add(self, block: np.ndarray) -> None:
        block = block[-self.capacity:]
        n = len(block)
        end = self.position + n
        if end <= self.capacity:
            self.rows[self.position:end] = block
        else:
            first = self.capacity - self.position
            self.rows[self.position:] = block[:first]
            self.rows[:n - first] = block[first:]
        self.position = end % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.since += n

    def filled(self) -> np.ndarray:
        return self.rows[:self.size]


class DriftMonitor:
    """Per model version, a window of logged input rows and each column's PSI."""

    def __init__(self, window: Callable[[], int], *, every: int = 100, min_rows: int = 200,
                 observer: DriftObserver | None = None) -> None:
        self._window = window
        self.every = every
        self.min_rows = min_rows
        self.observer = observer
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self.values: dict[tuple[str, str], dict[str, float]] = {}

    def observe(self, spec: ModelSpec, inputs: dict[str, np.ndarray]) -> None:
        """Add one answered request's inputs; recompute once ``every`` rows came in."""
        for tensor_name, reference in spec.reference.items():
            values = inputs.get(tensor_name)
            tensor = spec.input(tensor_name)
            if values is None or tensor is None or not tensor.columns or values.ndim != 2 \
                    or values.shape[1] != len(tensor.columns):
                continue
            key = (spec.name, spec.version, tensor_name)
            window = self._windows.get(key)
            capacity = self._window()
            if window is None or window.capacity != capacity:
                columns = [c for c in tensor.columns if c in reference]
                window = self._windows[key] = _Window(
                    columns, [tensor.columns.index(c) for c in columns], capacity)
            window.add(values[:, window.indices].astype(np.float64))
            if window.since >= self.every and window.size >= min(self.min_rows, capacity):
                window.since = 0
                self._recompute(spec, window, reference)

    def _recompute(self, spec: ModelSpec, window: _Window,
                   reference: dict[str, ColumnBins]) -> None:
        rows = window.filled()
        found = self.values.setdefault((spec.name, spec.version), {})
        for j, column in enumerate(window.columns):
            value = psi(reference[column], rows[:, j])
            found[column] = value
            if self.observer is not None:
                self.observer.feature_drift(spec.name, spec.version, column, value)

    def state(self) -> dict[str, Any]:
        """Per model and version, each feature's latest index and the rows behind it."""
        out: dict[str, Any] = {}
        for (model, version, _), window in sorted(self._windows.items()):
            values = self.values.get((model, version), {})
            out.setdefault(model, {})[version] = {
                "rows": window.size,
                "psi": {column: round(value, 4) for column, value in sorted(values.items())},
            }
        return out
