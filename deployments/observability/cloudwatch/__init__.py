"""Keel's metrics to Amazon CloudWatch as well, off by default (no Ray here).

``deployments.observability.ray_metrics.make`` wraps each ``ray.serve.metrics`` object
in an :class:`ExportedMetric` when ``KEEL_CLOUDWATCH_SINK`` is ``emf`` or
``put_metric_data``; with the sink ``off`` (the default) it returns the Ray object
untouched and nothing here runs.

* **Hot path**: ``inc``/``set``/``observe`` call the Ray metric as before, then add the
  value to this process's :class:`Aggregate` under one lock: counters summed, gauges
  last value, histograms as counts and sums per bucket of the catalog's bounds (plus
  min, max, count, sum). No I/O, no allocation beyond the first sight of a series, and
  an exception inside is counted, never raised.
* **Flusher**: one daemon thread per process swaps the aggregate out every
  ``KEEL_CLOUDWATCH_FLUSH_INTERVAL_S`` and ships it: EMF documents built with AWS's
  ``aws-embedded-metrics`` library (``MetricsContext`` + its ``LogSerializer``, which
  splits at 100 metrics per document) appended to a file or written to stdout, or
  ``PutMetricData`` calls through boto3 in batches of at most 1000 metric data and
  about 1 MB. A failing sink (an unwritable file, an endpoint that does not answer) is
  counted per operation (:data:`catalog.CLOUDWATCH_ERRORS`) and logged at most once an interval;
  that interval's data is dropped.
* **Histograms**: CloudWatch stores values with counts and computes percentiles from
  them. Each non-empty bucket is sent as one value, the mean of what fell in it, with
  its count: the sum and count are exact, a percentile is placed within the bucket
  (exact against every SLO threshold, which are all bucket bounds). PutMetricData gets
  ``Values``/``Counts``; EMF gets the ``{"Values", "Counts", "Max", "Min", "Count",
  "Sum"}`` object that AWS's own OpenTelemetry EMF exporter writes (exact min/max).
* **Dimensions**: ``KEEL_CLOUDWATCH_DIMENSIONS`` picks them from the replica's
  ``application`` and ``deployment`` and the metric's own tags; counters and histograms
  are also written under ``KEEL_CLOUDWATCH_ROLLUP_DIMENSIONS`` (default: the application
  alone), so that a percentile over every route and model exists (CloudWatch cannot
  merge percentiles of separate series).

The package: ``config.py`` (CloudWatch's limits, ``KEEL_CLOUDWATCH_*``), ``aggregate.py``
(the hot path's aggregate), ``documents.py`` (EMF documents and PutMetricData batches),
``exporter.py`` (the sinks, the exporter and its flusher, one per process). What other
rooms use is named here.
"""

from deployments.observability.cloudwatch.aggregate import Aggregate, Histogram, Snapshot
from deployments.observability.cloudwatch.config import (
    MAX_CALL_BYTES,
    NO_VALUE,
    UNITS,
    CloudWatchConfig,
    parse_settings,
    read_config,
)
from deployments.observability.cloudwatch.documents import (
    batches,
    datum_bytes,
    emf_documents,
    metric_data,
)
from deployments.observability.cloudwatch.exporter import (
    ExportedMetric,
    Exporter,
    process_exporter,
    reset_process_exporter,
)

__all__ = ["MAX_CALL_BYTES", "NO_VALUE", "UNITS", "Aggregate", "CloudWatchConfig",
           "ExportedMetric", "Exporter", "Histogram", "Snapshot", "batches", "datum_bytes",
           "emf_documents", "metric_data", "parse_settings", "process_exporter",
           "read_config", "reset_process_exporter"]
