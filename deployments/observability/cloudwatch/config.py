"""CloudWatch's limits and the exporter's configuration (``KEEL_CLOUDWATCH_*``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError

from deployments.errors import ConfigError
from deployments.observability import catalog
from deployments.observability.catalog import MetricSpec
from deployments.settings import CloudWatchSettings

log = logging.getLogger(__name__)


ENV_PREFIX = "KEEL_CLOUDWATCH_"

# --- CloudWatch's limits (PutMetricData and EMF, as documented in 2025) ------------------

#: Dimensions on one metric.
MAX_DIMENSIONS = 30
#: Metric data in one PutMetricData call (raised from 20 to 1000 in 2023).
MAX_DATA_PER_CALL = 1000
#: One PutMetricData call's body is limited to 1 MB; what we estimate stays under this.
MAX_CALL_BYTES = 900_000
#: Distinct values in one MetricDatum's Values/Counts.
MAX_VALUES_PER_DATUM = 150
#: Values/Counts entries in one EMF histogram object (AWS's EMF exporter splits there).
MAX_VALUES_PER_EMF = 100
#: Metrics in one EMF document (the library splits there too).
MAX_METRICS_PER_EMF = 100
MAX_NAMESPACE_CHARS = 255
MAX_DIMENSION_VALUE_CHARS = 1024
#: CloudWatch rejects values beyond ±2^360 (and NaN, ±Inf).
MAX_ABS = 2.0 ** 360

Sink = Literal["off", "emf", "put_metric_data"]
SINKS: tuple[str, ...] = ("off", "emf", "put_metric_data")
#: Dimension names taken from the replica rather than a metric's tags.
REPLICA_DIMENSIONS: tuple[str, ...] = ("application", "deployment")
#: Stands for an empty or missing dimension value (CloudWatch refuses empty ones).
NO_VALUE = "none"

#: CloudWatch's units (the same list as ``aws_embedded_metrics.unit.Unit``).
UNITS: tuple[str, ...] = (
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes",
    "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count",
    "Bytes/Second", "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second",
    "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second",
    "Gigabits/Second", "Terabits/Second", "Count/Second", "None",
)


def default_unit(name: str) -> str:
    """A metric's CloudWatch unit from its catalog name."""
    if name.endswith("_ms"):
        return "Milliseconds"
    if name.endswith("_seconds"):
        return "Seconds"
    if "usd" in name:
        return "None"
    if name.endswith(("_total", "_batch_size", "_events")):
        return "Count"
    return "None"


def tag_names() -> set[str]:
    """Every tag a catalog metric carries."""
    return {tag for spec in (*catalog.ALL, catalog.CLOUDWATCH_ERRORS) for tag in spec.tags}


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class CloudWatchConfig:
    """The export's validated settings (see ``CloudWatchSettings`` for each field)."""

    sink: Sink = "off"
    namespace: str = "Keel"
    dimensions: tuple[str, ...] = ("application", "tags")
    rollup_dimensions: tuple[str, ...] = ("application",)
    units: Mapping[str, str] = field(default_factory=dict)
    flush_interval_s: float = 60.0
    emf_file: str = ""
    region: str = ""
    endpoint_url: str = ""
    timeout_s: float = 5.0

    def dimension_names(self, spec: MetricSpec) -> tuple[str, ...]:
        """The dimensions ``spec`` is written with (replica ones first, then its tags)."""
        names = [d for d in REPLICA_DIMENSIONS if d in self.dimensions]
        names += [t for t in spec.tags if "tags" in self.dimensions or t in self.dimensions]
        return tuple(names)

    def rollup_names(self, spec: MetricSpec) -> tuple[str, ...] | None:
        """The coarser dimension set of a counter or histogram; ``None``: none (a gauge,
        no rollup configured, or one equal to the full set)."""
        if spec.kind == "gauge" or not self.rollup_dimensions:
            return None
        full = self.dimension_names(spec)
        every_tag = "tags" in self.rollup_dimensions
        names = tuple(d for d in full if d in self.rollup_dimensions
                      or (every_tag and d not in REPLICA_DIMENSIONS))
        return None if names == full else names

    def dimension_sets(self, spec: MetricSpec) -> list[tuple[str, ...]]:
        """Every dimension set ``spec`` is written with: what a dashboard may query."""
        rollup = self.rollup_names(spec)
        return [self.dimension_names(spec)] + ([rollup] if rollup is not None else [])

    def unit(self, spec: MetricSpec) -> str:
        return self.units.get(spec.name) or default_unit(spec.name)


def _names(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def env_variable(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def parse_settings(settings: CloudWatchSettings) -> CloudWatchConfig:
    """Check ``settings``; a ``ConfigError`` names the variable that is wrong."""

    def refuse(field_name: str, message: str) -> ConfigError:
        return ConfigError(f"{env_variable(field_name)}: {message}")

    sink = settings.sink.strip().lower()
    if sink not in SINKS:
        raise refuse("sink", f"{settings.sink!r} is not one of {', '.join(SINKS)}")
    namespace = settings.namespace.strip()
    if not namespace:
        raise refuse("namespace", "empty; CloudWatch needs a namespace (default Keel)")
    if len(namespace) > MAX_NAMESPACE_CHARS or not re.fullmatch(r"[a-zA-Z0-9._#:/-]+",
                                                                  namespace):
        raise refuse("namespace", f"{namespace!r}: at most {MAX_NAMESPACE_CHARS} of "
                     f"a-z A-Z 0-9 . _ # : / -")
    if namespace.startswith("AWS/"):
        raise refuse("namespace", f"{namespace!r}: AWS/ is reserved for AWS services")
    known = set(REPLICA_DIMENSIONS) | {"tags"} | tag_names()
    dimensions = _names(settings.dimensions)
    rollup = _names(settings.rollup_dimensions)
    if len(dimensions) > MAX_DIMENSIONS:
        raise refuse("dimensions", f"{len(dimensions)} dimensions; CloudWatch allows at "
                     f"most {MAX_DIMENSIONS}")
    for field_name, names in (("dimensions", dimensions), ("rollup_dimensions", rollup)):
        unknown = sorted(set(names) - known)
        if unknown:
            raise refuse(field_name, f"unknown {unknown}; use application, deployment, tags "
                         f"or tag names ({', '.join(sorted(tag_names()))})")
        if len(names) != len(set(names)):
            raise refuse(field_name, f"duplicates in {list(names)}")
    allowed = set(dimensions) | (tag_names() if "tags" in dimensions else set())
    outside = sorted(set(rollup) - allowed)
    if outside:
        raise refuse("rollup_dimensions", f"{outside} not in KEEL_CLOUDWATCH_DIMENSIONS "
                     f"({', '.join(dimensions)}): a rollup is a subset of the dimensions")
    units: dict[str, str] = {}
    metrics = {spec.name for spec in catalog.ALL} | {catalog.CLOUDWATCH_ERRORS.name}
    for item in _names(settings.units):
        metric, sep, unit = (part.strip() for part in item.partition("="))
        if not sep or metric not in metrics:
            raise refuse("units", f"{item!r}: expected <catalog metric>=<unit>")
        if unit not in UNITS:
            raise refuse("units", f"{unit!r} is not a CloudWatch unit ({', '.join(UNITS)})")
        units[metric] = unit
    if not 0 < settings.flush_interval_s <= 3600:
        raise refuse("flush_interval_s", f"{settings.flush_interval_s}: must be in (0, 3600]")
    if not 0 < settings.timeout_s <= 60:
        raise refuse("timeout_s", f"{settings.timeout_s}: must be in (0, 60]")
    config = CloudWatchConfig(
        sink=sink,  # type: ignore[arg-type]  # checked against SINKS above
        namespace=namespace, dimensions=dimensions, rollup_dimensions=rollup, units=units,
        flush_interval_s=settings.flush_interval_s, emf_file=settings.emf_file.strip(),
        region=settings.region.strip(), endpoint_url=settings.endpoint_url.strip(),
        timeout_s=settings.timeout_s)
    for spec in (*catalog.ALL, catalog.CLOUDWATCH_ERRORS):
        if len(config.dimension_names(spec)) > MAX_DIMENSIONS:
            raise refuse("dimensions", f"{spec.name} would have "
                         f"{len(config.dimension_names(spec))} dimensions (at most "
                         f"{MAX_DIMENSIONS})")
    return config


def read_config() -> CloudWatchConfig:
    """The configuration from this process's environment; ``ConfigError`` naming the
    variable when a value is malformed."""
    try:
        settings = CloudWatchSettings()
    except ValidationError as exc:
        problems = "; ".join(f"{env_variable(str(err['loc'][0]))}: {err['msg']}"
                             for err in exc.errors())
        raise ConfigError(problems) from exc
    return parse_settings(settings)
