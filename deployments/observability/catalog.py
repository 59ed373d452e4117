"""Every metric Keel exports, in one place (no Ray here).

The Ray shells create them through ``deployments.observability.ray_metrics``;
Prometheus rules, Grafana panels and their tests read the names from here. Ray's
exporter prefixes application metrics with ``ray_`` (``keel_requests_total`` is
scraped as ``ray_keel_requests_total``). Tag names avoid the ones Serve reserves
(deployment, replica, application, route).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Exported name = RAY_PREFIX + name.
RAY_PREFIX = "ray_"

#: Millisecond buckets fine enough for SLOs of 25/50/80 ms (Ray's defaults are too
#: coarse, ray issue 38223). Every default SLO threshold is a bucket bound, so
#: "share of requests within the threshold" is exact, not interpolated.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 125, 150, 200, 250,
    300, 400, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000,
)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its name (without Ray's prefix), kind, tags and buckets."""

    name: str
    kind: Kind
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus sees."""
        return RAY_PREFIX + self.name


REQUESTS = MetricSpec("keel_requests_total", "counter",
                      "HTTP requests answered by the ingress, by route, model, the version "
                      "that answered (empty: none did) and status code.",
                      ("http_route", "model", "version", "status"))
REQUEST_LATENCY = MetricSpec("keel_request_latency_ms", "histogram",
                             "Time from the ingress receiving a request to its answer, in ms.",
                             ("http_route", "model", "version"), LATENCY_BUCKETS_MS)
MODEL_LATENCY = MetricSpec("keel_model_latency_ms", "histogram",
                           "Round trip of one model call seen from the ingress (hop, queue, "
                           "batch wait, ONNX Runtime), in ms.", ("model",), LATENCY_BUCKETS_MS)
MODEL_BATCH_SIZE = MetricSpec("keel_model_batch_size", "histogram",
                              "Requests sharing one ONNX Runtime call (micro-batch size).",
                              ("model",), BATCH_BUCKETS)
MODEL_LOADS = MetricSpec("keel_model_loads_total", "counter",
                         "Model versions loaded by a replica (start and every reload).",
                         ("model", "version"))
FEATURE_BATCH_SIZE = MetricSpec("keel_feature_batch_size", "histogram",
                                "Lookups merged into one online-store call.", (), BATCH_BUCKETS)
FEATURE_AGE = MetricSpec("keel_feature_age_seconds", "gauge",
                         "Age of the oldest feature row served in the last lookup batch "
                         "(now - event timestamp).", ("feature_view",))
CACHE_ROWS = MetricSpec("keel_cache_rows_total", "counter",
                        "Rows looked up in the prediction cache, by model version and result "
                        "(hit, miss, shared).", ("model", "version", "result"))
CACHE_ERRORS = MetricSpec("keel_cache_errors_total", "counter",
                          "Redis commands of the prediction cache that failed (the in-process "
                          "fallback answered).", ("operation",))
CACHE_HIT_RATIO = MetricSpec("keel_cache_hit_ratio", "gauge",
                             "Share of rows answered without the model, since the replica "
                             "started.", ("model",))
#: Sub-millisecond buckets: a lookup in the in-process layer takes microseconds, one in
#: Redis a few hundred.
CACHE_BUCKETS_MS: tuple[float, ...] = (
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 25, 50, 100, 250, 1000,
)
CACHE_LOOKUP = MetricSpec("keel_cache_lookup_ms", "histogram",
                          "One request's prediction-cache lookup: the in-process layer, one "
                          "Redis MGET for the rest, decoding, in ms.", ("model",),
                          CACHE_BUCKETS_MS)
CACHE_WRITE = MetricSpec("keel_cache_write_ms", "histogram",
                         "One write-back of computed rows to Redis (after the answer), in ms.",
                         ("model",), CACHE_BUCKETS_MS)
CACHE_LOCAL_ENTRIES = MetricSpec("keel_cache_local_entries", "gauge",
                                 "Entries in this replica's in-process cache layer (bounded "
                                 "by local_max_entries).")
CACHE_LOCAL_EVICTIONS = MetricSpec("keel_cache_local_evictions_total", "counter",
                                   "Entries the in-process cache layer evicted to stay within "
                                   "local_max_entries.")
#: |live score - shadow score| per row: from bit-level noise (INT8 against FP32) to a
#: different model.
DIFFERENCE_BUCKETS: tuple[float, ...] = (
    1e-6, 1e-5, 1e-4, 1e-3, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1,
)
SHADOW_TAGS = ("model", "version", "shadow_version")
SHADOW_COMPARED = MetricSpec("keel_shadow_compared_total", "counter",
                             "Rows answered by the live version and also by its shadow "
                             "version, and compared.", SHADOW_TAGS)
SHADOW_FLIPS = MetricSpec("keel_shadow_decision_flips_total", "counter",
                          "Compared rows whose decision (the model's decision rule; else the "
                          "arg-max class) differs between the live and the shadow version.",
                          SHADOW_TAGS)
SHADOW_DIFFERENCE = MetricSpec("keel_shadow_score_difference", "histogram",
                               "Per compared row, |live score - shadow score| (the decision "
                               "rule's score; else the largest output difference).",
                               SHADOW_TAGS, DIFFERENCE_BUCKETS)
SHADOW_DROPPED = MetricSpec("keel_shadow_dropped_total", "counter",
                            "Shadow copies not compared: the ingress's shadow queue was full, "
                            "or the shadow call failed. Live requests are never affected.",
                            (*SHADOW_TAGS, "reason"))
PAYLOADS_LOGGED = MetricSpec("keel_payloads_logged_total", "counter",
                             "Payload records (sampled answered requests) appended to the "
                             "payload log's Redis Stream.", ())
PAYLOADS_DROPPED = MetricSpec("keel_payloads_dropped_total", "counter",
                              "Sampled payload records not appended: queue_full, no_redis "
                              "(none configured) or redis_error. Requests are never affected.",
                              ("reason",))
FEATURE_DRIFT = MetricSpec("keel_feature_drift_psi", "gauge",
                           "Population Stability Index of an input feature's logged live "
                           "values (the payload log's sample, last payloads.drift_window "
                           "rows) against its training distribution in model.yaml.",
                           ("model", "version", "feature"))
LLM_REQUESTS = MetricSpec("keel_llm_requests_total", "counter",
                          "Chat completions answered by the LLM gateway, by cache result "
                          "(hit, miss, bypass).", ("model", "tenant", "result"))
LLM_TOKENS = MetricSpec("keel_llm_tokens_total", "counter",
                        "Tokens of LLM answers by kind (prompt, completion) and source "
                        "(upstream: paid, cache: not paid).", ("model", "tenant", "kind",
                                                               "source"))
LLM_COST = MetricSpec("keel_llm_cost_usd_total", "counter",
                      "US dollars spent on upstream LLM calls (from the price table).",
                      ("model", "tenant"))
LLM_COST_AVOIDED = MetricSpec("keel_llm_cost_avoided_usd_total", "counter",
                              "US dollars the prompt cache saved (what its hits would have "
                              "cost upstream).", ("model", "tenant"))
LLM_UPSTREAM_CALLS = MetricSpec("keel_llm_upstream_calls_total", "counter",
                                "Calls to LLM upstreams by outcome (ok, or the status Keel "
                                "answered: 429, 502, 503, 504...).",
                                ("upstream", "model", "outcome"))
LLM_CACHE_ERRORS = MetricSpec("keel_llm_cache_errors_total", "counter",
                              "Redis commands of the prompt cache and usage ledger that "
                              "failed.", ("operation",))
LLM_CACHE_HIT_RATIO = MetricSpec("keel_llm_cache_hit_ratio", "gauge",
                                 "Share of cacheable chat completions answered from the "
                                 "prompt cache, since the replica started.")
LLM_COST_PER_MAU = MetricSpec("keel_llm_cost_per_mau_usd", "gauge",
                              "This month's LLM spend over this month's active users "
                              "(target 0.05).", ("tenant",))
SLO_VALUE = MetricSpec("keel_slo_value", "gauge",
                       "The SLO's measured value over the window (ms for latency objectives, "
                       "a ratio otherwise), for the whole application.", ("slo", "window"))
SLO_TARGET = MetricSpec("keel_slo_target", "gauge", "The SLO's target (same unit as the value).",
                        ("slo",))
SLO_COMPLIANT = MetricSpec("keel_slo_compliant", "gauge",
                           "1 when the SLO is met over the window, else 0.", ("slo", "window"))
SLO_BUDGET = MetricSpec("keel_slo_error_budget_remaining", "gauge",
                        "Share of the window's error budget left (1: untouched, 0: spent, "
                        "negative: overspent).", ("slo", "window"))
SLO_EVENTS = MetricSpec("keel_slo_events", "gauge",
                        "Events counted in the window (requests, model calls or cache rows).",
                        ("slo", "window"))

ALL: tuple[MetricSpec, ...] = (
    REQUESTS, REQUEST_LATENCY, MODEL_LATENCY, MODEL_BATCH_SIZE, MODEL_LOADS, FEATURE_BATCH_SIZE,
    FEATURE_AGE, CACHE_ROWS, CACHE_ERRORS, CACHE_HIT_RATIO, CACHE_LOOKUP, CACHE_WRITE,
    CACHE_LOCAL_ENTRIES, CACHE_LOCAL_EVICTIONS, SHADOW_COMPARED, SHADOW_FLIPS,
    SHADOW_DIFFERENCE, SHADOW_DROPPED, PAYLOADS_LOGGED, PAYLOADS_DROPPED, FEATURE_DRIFT,
    SLO_VALUE, SLO_TARGET, SLO_COMPLIANT, SLO_BUDGET, SLO_EVENTS, LLM_REQUESTS, LLM_TOKENS,
    LLM_COST, LLM_COST_AVOIDED,
    LLM_UPSTREAM_CALLS, LLM_CACHE_ERRORS, LLM_CACHE_HIT_RATIO, LLM_COST_PER_MAU,
)

#: The CloudWatch exporter's own failures (deployments/observability/cloudwatch/): exported
#: through Ray like the rest, but not in ``ALL``, which is what goes to CloudWatch (a
#: failing sink cannot report its own failures).
#: By operation: ``emf`` (writing EMF lines), ``put_metric_data`` (a call that failed),
#: ``record`` (a value that could not be aggregated), ``flush`` (anything else).
CLOUDWATCH_ERRORS = MetricSpec(
    "keel_cloudwatch_errors_total", "counter",
    "CloudWatch export failures (EMF writes, PutMetricData calls, values not recorded); "
    "the interval's data is dropped, requests are never affected.", ("operation",))


def exported_names() -> set[str]:
    """Every series name Prometheus can see from Keel (histograms: _bucket, _sum, _count)."""
    names: set[str] = set()
    for spec in ALL:
        if spec.kind == "histogram":
            names |= {spec.exported + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(spec.exported)
    return names
