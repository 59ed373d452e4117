"""The drift monitor: PSI of logged inputs against the training deciles in model.yaml."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.ingress.rollout.drift import DriftMonitor, psi
from deployments.repository import ColumnBins, ModelSpec, TensorSpec


def _deciles(values: np.ndarray) -> ColumnBins:
    edges = np.unique(np.quantile(values, np.arange(1, 10) / 10))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return ColumnBins(edges=edges.tolist(), shares=(counts / len(values)).tolist())


def _spec(reference: dict[str, ColumnBins]) -> ModelSpec:
    return ModelSpec(
        name="m", version="1",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 3], columns=["a", "b", "c"])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
        reference={"x": reference})


def test_psi_is_near_zero_for_the_training_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(1)
    reference = _deciles(rng.normal(size=20_000))
    assert psi(reference, rng.normal(size=2000)) < 0.02
    assert 0.1 < psi(reference, rng.normal(0.4, 1.0, size=2000)) < 0.25  # a moderate shift
    assert psi(reference, rng.normal(1.5, 1.0, size=2000)) > 0.25
    assert psi(reference, np.full(500, 100.0)) > 5  # everything in the last bin
    with_nan = np.concatenate([rng.normal(size=2000), np.full(100, np.nan)])
    assert psi(reference, with_nan) < 0.02  # NaN rows are left out
    assert psi(reference, np.array([])) == 0.0


def test_the_monitor_keeps_a_window_per_version_and_recomputes_every_100_rows() -> None:
    rng = np.random.default_rng(2)
    training = rng.normal(size=(20_000, 3))
    spec = _spec({"a": _deciles(training[:, 0]), "c": _deciles(training[:, 2])})
    seen: list[tuple[str, str, str, float]] = []

    class Observer:
        def feature_drift(self, model: str, version: str, feature: str, value: float) -> None:
            seen.append((model, version, feature, value))

    monitor = DriftMonitor(lambda: 300, observer=Observer())
    for _ in range(3):  # 150 rows: below min_rows (200), nothing yet
        monitor.observe(spec, {"x": rng.normal(size=(50, 3))})
    assert seen == []
    monitor.observe(spec, {"x": rng.normal(size=(50, 3))})  # 200 rows: the first index
    assert [(m, v, f) for m, v, f, _ in seen] == [("m", "1", "a"), ("m", "1", "c")]
    assert all(value < 0.1 for *_, value in seen)
    shifted = rng.normal(size=(1000, 3))
    shifted[:, 2] += 2.0  # only column c moves
    monitor.observe(spec, {"x": shifted})  # a block larger than the window: its last 300
    state = monitor.state()["m"]["1"]
    assert state["rows"] == 300
    assert state["psi"]["a"] < 0.1 and state["psi"]["c"] > 0.25
    assert "b" not in state["psi"]  # no reference, not monitored
    monitor.observe(spec, {"x": rng.normal(size=(40, 2))})  # not this tensor's shape: ignored
    monitor.observe(spec, {"other": rng.normal(size=(40, 3))})
    assert monitor.state()["m"]["1"]["rows"] == 300


@pytest.mark.parametrize(("bins", "message"), [
    ({"edges": [1.0, 0.5], "shares": [0.3, 0.3, 0.4]}, "strictly ascending"),
    ({"edges": [0.0, float("inf")], "shares": [0.3, 0.3, 0.4]}, "finite"),
    ({"edges": [0.0], "shares": [0.3, 0.3, 0.4]}, "1 edges make 2 bins"),
    ({"edges": [0.0], "shares": [0.3, 0.3]}, "sum to 1"),
    ({"edges": [0.0], "shares": [1.5, -0.5]}, "non-negative"),
])
def test_bad_reference_bins_are_refused(bins: dict[str, list[float]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ColumnBins.model_validate(bins)


def test_a_reference_must_name_declared_input_columns() -> None:
    bins = ColumnBins(edges=[0.0], shares=[0.5, 0.5])
    with pytest.raises(ValidationError, match=r"reference\.x: \['z'\] are not among"):
        _spec({"z": bins})
    with pytest.raises(ValidationError, match=r"reference\.nope: not an input"):
        ModelSpec(name="m", version="1",
                  inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 1], columns=["a"])],
                  outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
                  reference={"nope": {"a": bins}})
