"""Ray metric objects for the catalog's specs (the Ray side of ``catalog``).

With ``KEEL_CLOUDWATCH_SINK`` set, each is also exported to CloudWatch
(``deployments.observability.cloudwatch``); off (the default), ``make`` returns the Ray
object itself.
"""

from __future__ import annotations

from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

from deployments.observability import catalog, cloudwatch
from deployments.observability.catalog import MetricSpec
from deployments.observability.replica import replica_identity


def _ray_metric(spec: MetricSpec) -> Any:
    tags: Any = spec.tags or None  # Ray's stub says tuple[str]; any number of keys works
    if spec.kind == "counter":
        return Counter(spec.name, description=spec.description, tag_keys=tags)
    if spec.kind == "gauge":
        return Gauge(spec.name, description=spec.description, tag_keys=tags)
    return Histogram(spec.name, description=spec.description, boundaries=list(spec.buckets),
                     tag_keys=tags)


def make(spec: MetricSpec) -> Any:
    """A ``ray.serve.metrics`` Counter, Gauge or Histogram for ``spec`` (wrapped to feed
    CloudWatch too when its export is on).

    Create them inside the replica (in ``__init__``), once per process. A malformed
    ``KEEL_CLOUDWATCH_*`` setting raises ``ConfigError`` here, so the replica does not
    start.
    """
    metric = _ray_metric(spec)
    exporter = cloudwatch.process_exporter()
    if exporter is None:
        return metric
    if exporter.on_error is None:
        errors = _ray_metric(catalog.CLOUDWATCH_ERRORS)
        exporter.on_error = lambda operation, count: errors.inc(
            count, tags={"operation": operation})
    application, deployment = replica_identity()
    return exporter.wrap(spec, metric, application=application, deployment=deployment)
