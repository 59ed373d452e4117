"""``keel render-cloudwatch``: the CloudWatch SLO dashboard from Keel's own definitions.

The widgets come from the SLO monitor's objectives and windows (``SloConfig``'s
defaults: API p50 ≤ 25 ms, p95 ≤ 80 ms, model p95 ≤ 50 ms, success ≥ 99.9 %, cache hit
ratio ≥ 30 %), the LLM gateway's cost-per-MAU target, and the metric names, units and
dimension sets the CloudWatch exporter writes (``deployments.observability.cloudwatch``),
so a dashboard metric is always one the exporter sends. The body is what
``aws cloudwatch put-dashboard --dashboard-body file://...`` takes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deployments.errors import ConfigError
from deployments.llm.config import LLMGatewayConfig
from deployments.observability import catalog
from deployments.observability.catalog import MetricSpec
from deployments.observability.cloudwatch import CloudWatchConfig
from deployments.observability.slo import WINDOW_SECONDS, Objective, SloConfig

#: Where the committed dashboard lives, relative to the repository root.
DASHBOARD_PATH = Path("configs/monitoring/cloudwatch/keel-slo-dashboard.json")
DEFAULT_REGION = "us-east-1"
DEFAULT_APPLICATION = "keel"
#: The deployment that writes each metric the dashboard reads by exact dimensions (used
#: only when ``deployment`` is one of the exporter's dimensions).
PRODUCERS: dict[str, str] = {
    catalog.REQUEST_LATENCY.name: "Ingress",
    catalog.REQUESTS.name: "Ingress",
    catalog.MODEL_LATENCY.name: "Ingress",
    catalog.SLO_VALUE.name: "SloMonitor",
    catalog.SLO_TARGET.name: "SloMonitor",
    catalog.SLO_COMPLIANT.name: "SloMonitor",
    catalog.SLO_BUDGET.name: "SloMonitor",
    catalog.SLO_EVENTS.name: "SloMonitor",
}
WIDTH, HEIGHT = 12, 6
#: The period of every widget (s): CloudWatch's standard resolution is a minute.
PERIOD = 60


class _Builder:
    """Metric rows for one exporter configuration."""

    def __init__(self, config: CloudWatchConfig, region: str, application: str) -> None:
        self.config = config
        self.region = region
        self.application = application
        self._ids = 0

    def row(self, spec: MetricSpec, values: dict[str, str], stat: str, label: str,
            *, rollup: bool = False) -> list[Any]:
        """``[namespace, name, dim, value, ..., {stat, label}]`` for one of the exporter's
        dimension sets of ``spec`` (the full one, or its rollup)."""
        names = self.config.rollup_names(spec) if rollup else self.config.dimension_names(spec)
        if names is None:
            raise ConfigError(f"the dashboard needs a rollup of {spec.name} "
                              f"(KEEL_CLOUDWATCH_ROLLUP_DIMENSIONS)")
        dropped = sorted(set(values) - set(names))
        if dropped:
            raise ConfigError(f"the dashboard tells {spec.name} series apart by {dropped}; "
                              f"KEEL_CLOUDWATCH_DIMENSIONS must keep them")
        given = {"application": self.application, **values}
        if "deployment" in names and spec.name in PRODUCERS:
            given["deployment"] = PRODUCERS[spec.name]
        missing = [n for n in names if n not in given]
        if missing:
            raise ConfigError(f"the dashboard reads {spec.name} by {sorted(given)}; the "
                              f"exporter's dimensions {list(names)} also need {missing}")
        row: list[Any] = [self.config.namespace, spec.name]
        for name in names:
            row += [name, given[name]]
        return [*row, {"stat": stat, "label": label}]

    def search(self, spec: MetricSpec, stat: str, label: str) -> list[Any]:
        """A ``SEARCH`` over every series of ``spec`` (one line per tag value)."""
        self._ids += 1
        schema = ",".join([self.config.namespace, *self.config.dimension_names(spec)])
        query = f"{{{schema}}} MetricName=\"{spec.name}\""
        return [{"expression": f"SEARCH('{query}', '{stat}', {PERIOD})",
                 "id": f"e{self._ids}", "label": label, "period": PERIOD}]

    def widget(self, title: str, rows: Sequence[list[Any]], *, stat: str = "Average",
               targets: Sequence[tuple[str, float]] = (), y_min: float | None = None,
               y_max: float | None = None, unit_label: str = "") -> dict[str, Any]:
        properties: dict[str, Any] = {
            "title": title, "view": "timeSeries", "stacked": False, "region": self.region,
            "stat": stat, "period": PERIOD, "metrics": list(rows)}
        if targets:
            properties["annotations"] = {"horizontal": [
                {"label": label, "value": value} for label, value in targets]}
        y_axis: dict[str, Any] = {"showUnits": False}
        if y_min is not None:
            y_axis["min"] = y_min
        if y_max is not None:
            y_axis["max"] = y_max
        if unit_label:
            y_axis["label"] = unit_label
        properties["yAxis"] = {"left": y_axis}
        return {"type": "metric", "width": WIDTH, "height": HEIGHT, "properties": properties}


def _target_label(objective: Objective) -> str:
    if objective.kind == "latency":
        return f"{objective.name} target ≤ {objective.target_value:g} ms"
    return f"{objective.name} target ≥ {objective.target_value:g}"


def render(config: CloudWatchConfig | None = None, slo: SloConfig | None = None, *,
           llm: LLMGatewayConfig | None = None, region: str = DEFAULT_REGION,
           application: str = DEFAULT_APPLICATION) -> dict[str, Any]:
    """The dashboard body (a dict; ``dumps`` writes it)."""
    config = config or CloudWatchConfig()
    slo = slo or SloConfig()
    llm = llm or LLMGatewayConfig()
    b = _Builder(config, region, application)
    # The middle window for values, the longest for error budgets.
    windows = sorted(slo.windows, key=WINDOW_SECONDS.__getitem__)
    value_window = windows[len(windows) // 2]
    budget_window = windows[-1]
    by_series: dict[tuple[str, str], list[Objective]] = {}
    for objective in slo.objectives:
        by_series.setdefault((objective.series, objective.kind), []).append(objective)

    def slo_row(objective: Objective, window: str, spec: MetricSpec = catalog.SLO_VALUE,
                stat: str = "Average") -> list[Any]:
        return b.row(spec, {"slo": objective.name, "window": window}, stat,
                     f"{objective.name} ({window})")

    text = (f"# Keel SLOs\nGenerated by `keel render-cloudwatch` from the SLO monitor's "
            f"objectives and the CloudWatch exporter's metrics (namespace "
            f"`{config.namespace}`). SLO lines are the monitor's verdicts over the "
            f"{value_window} window (`keel_slo_value`); percentile lines are CloudWatch's "
            f"own, from the exported histograms (every route and model). Horizontal lines "
            f"are the targets.")
    widgets: list[dict[str, Any]] = [{"type": "text", "width": 24, "height": 2,
                                      "properties": {"markdown": text}}]
    # Latency objectives, one widget per series (api, model, any custom one).
    raw = {"api": catalog.REQUEST_LATENCY, "model": catalog.MODEL_LATENCY}
    for (series, kind), objectives in by_series.items():
        if kind != "latency":
            continue
        rows = [slo_row(o, value_window) for o in objectives]
        spec = raw.get(series)
        if spec is not None:
            for pct in sorted({o.percentile for o in objectives if o.percentile} | {99.0}):
                rows.append(b.row(spec, {}, f"p{pct:g}", f"{spec.name} p{pct:g} (all)",
                                  rollup=True))
        title = {"api": "API latency vs targets (ms)",
                 "model": "Model latency vs target (ms)"}.get(series,
                                                               f"{series} latency (ms)")
        widgets.append(b.widget(title, rows, targets=[(_target_label(o), o.target_value)
                                                      for o in objectives], y_min=0))
    widgets.append(b.widget("Model latency p95 per model (ms)",
                            [b.search(catalog.MODEL_LATENCY, "p95", "")], y_min=0))
    # Ratio objectives: success, cache hit ratio, custom ones.
    for (_series, kind), objectives in by_series.items():
        if kind == "latency":
            continue
        for objective in objectives:
            rows = [slo_row(objective, window) for window in windows]
            title = ("Success ratio (5xx count against it, 4xx do not)"
                     if objective.kind == "success" else
                     "Cache hit ratio (hit + shared rows)" if objective.series == "cache"
                     else f"{objective.name} (ratio)")
            widgets.append(b.widget(title, rows, targets=[(_target_label(objective),
                                                           objective.target_value)],
                                    y_max=1))
    widgets.append(b.widget(
        f"Error budget remaining ({budget_window}; 1 untouched, 0 spent)",
        [slo_row(o, budget_window, catalog.SLO_BUDGET) for o in slo.objectives],
        targets=[("spent", 0.0)]))
    widgets.append(b.widget(
        f"Compliant ({value_window}; 1 met, 0 not)",
        [slo_row(o, value_window, catalog.SLO_COMPLIANT, "Minimum") for o in slo.objectives],
        stat="Minimum", y_min=0, y_max=1))
    widgets.append(b.widget(
        "LLM cost per monthly active user (USD)",
        [b.search(catalog.LLM_COST_PER_MAU, "Maximum", "")], stat="Maximum",
        targets=[(f"target {llm.target_cost_per_mau_usd:g} USD",
                  llm.target_cost_per_mau_usd)], y_min=0))
    # Traffic and the serving path.
    widgets.append(b.widget("Requests answered (all routes, per minute)",
                            [b.row(catalog.REQUESTS, {}, "Sum", "requests", rollup=True)],
                            stat="Sum", y_min=0))
    widgets.append(b.widget("Requests by route, model and status (per minute)",
                            [b.search(catalog.REQUESTS, "Sum", "")], stat="Sum", y_min=0))
    widgets.append(b.widget("Micro-batch size per model (p50, p95)",
                            [b.search(catalog.MODEL_BATCH_SIZE, "p50", "p50"),
                             b.search(catalog.MODEL_BATCH_SIZE, "p95", "p95")], y_min=0))
    widgets.append(b.widget("Cache rows by model and result (per minute)",
                            [b.search(catalog.CACHE_ROWS, "Sum", "")], stat="Sum", y_min=0))
    widgets.append(b.widget("Cache hit ratio per model (since replica start)",
                            [b.search(catalog.CACHE_HIT_RATIO, "Average", "")], y_max=1))
    widgets.append(b.widget("Feature age (oldest row served, s)",
                            [b.search(catalog.FEATURE_AGE, "Maximum", "")], stat="Maximum",
                            y_min=0))
    widgets.append(b.widget("Cache errors (Redis commands that failed)",
                            [b.search(catalog.CACHE_ERRORS, "Sum", "")], stat="Sum", y_min=0))
    _place(widgets)
    return {
        "start": "-PT3H",
        "periodOverride": "inherit",
        "variables": [{"type": "property", "property": "application", "inputType": "input",
                       "id": "application", "label": "Application",
                       "defaultValue": application, "visible": True}],
        "widgets": widgets,
    }


def _place(widgets: list[dict[str, Any]]) -> None:
    """Lay the widgets out left to right, top to bottom, on CloudWatch's 24-column grid."""
    x = y = row_height = 0
    for widget in widgets:
        if x + widget["width"] > 24:
            x, y, row_height = 0, y + row_height, 0
        widget["x"], widget["y"] = x, y
        x += widget["width"]
        row_height = max(row_height, widget["height"])


def dumps(body: dict[str, Any]) -> str:
    """The committed form: stable, indented, one trailing newline."""
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


def metric_references(body: dict[str, Any]) -> list[tuple[str, str, tuple[str, ...], str]]:
    """Every metric the dashboard reads: (namespace, name, dimension names, stat), from
    metric rows and from ``SEARCH('{namespace,dims...} MetricName="..."', stat, period)``."""
    found: list[tuple[str, str, tuple[str, ...], str]] = []
    search = re.compile(r"SEARCH\('\{([^}]*)\} MetricName=\"([^\"]+)\"', '([^']+)'")
    for widget in body["widgets"]:
        for row in widget.get("properties", {}).get("metrics", []):
            if isinstance(row[0], dict):
                match = search.search(row[0]["expression"])
                if match is None:
                    raise ValueError(f"unknown expression {row[0]['expression']!r}")
                namespace, *dims = match.group(1).split(",")
                found.append((namespace, match.group(2), tuple(dims), match.group(3)))
                continue
            options = row[-1] if isinstance(row[-1], dict) else {}
            pairs = row[2:-1] if options else row[2:]
            stat = options.get("stat") or widget["properties"].get("stat", "Average")
            found.append((row[0], row[1], tuple(pairs[0::2]), stat))
    return found
