"""Ray metric objects for the catalog's specs (the Ray side of ``catalog``)."""

from __future__ import annotations

from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

from deployments.observability.catalog import MetricSpec


def make(spec: MetricSpec) -> Any:
    """A ``ray.serve.metrics`` Counter, Gauge or Histogram for ``spec``.

    Create them inside the replica (in ``__init__``), once per process.
    """
    tags: Any = spec.tags or None  # Ray's stub says tuple[str]; any number of keys works
    if spec.kind == "counter":
        return Counter(spec.name, description=spec.description, tag_keys=tags)
    if spec.kind == "gauge":
        return Gauge(spec.name, description=spec.description, tag_keys=tags)
    return Histogram(spec.name, description=spec.description, boundaries=list(spec.buckets),
                     tag_keys=tags)
