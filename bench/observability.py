"""What Keel's observability costs, and whether its figures agree with the client's.

Keel runs as ``make demo`` runs it (``harness.keel_server``: ``serve run serve_config.yaml``
with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1``, load to HAProxy
on the HTTP port), in two or three configurations, each started and stopped in turn,
interleaved per repeat (the order alternates), medians over the repeats:

- ``off``: Ingress ``user_config.metrics: false`` (no Keel request metrics, no SLO
  events), tracing not configured;
- ``on``: ``metrics: true`` and Serve's tracing with Keel's exporter for every request
  (``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=deployments.observability.replica:span_processors``,
  ``RAY_SERVE_TRACING_SAMPLING_RATIO=1.0``), spans sent over OTLP/HTTP to
  ``harness.otlp_sink`` (a separate process started here that counts and discards them);
- ``on_sampled_1pct`` (optional): the same with a sampling ratio of 0.01.

Both use ``cache: {enabled: false}`` on the Ingress, so every request reaches the
model (the prediction cache is not what is measured).

After the sweep of the last ``on`` server: a ``--slo-duration`` (60 s) load at
``--slo-concurrency`` (8), then at once ``GET /v1/slo``, compared with the client's own
percentiles and counts over the same seconds (per-request wall-clock timestamps); during
that load, a scrape of Ray's Prometheus endpoint (``ray_keel_*`` and some
``ray_serve_*`` lines) and a second one after it, checked against what was sent.

Writes ``results/<ts>-observability.json``, ``.png``, ``<ts>-metrics-scrape.txt``,
the server logs in ``<ts>-observability-logs/``, and prints markdown tables.

    .venv/bin/python -m bench.observability                           # ~13 min
    .venv/bin/python -m bench.observability --repeats 1 --duration 3 --warmup 1 \
        --concurrency 8 --slo-duration 15                              # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.harness import options
from bench.harness.http_load import install_fast_loop, make_bodies
from bench.harness.network import free_port
from bench.harness.network import http_get_or_error as http_get_full
from bench.harness.progress import Progress, log
from bench.harness.report import (
    REPO_ROOT,
    RunDocument,
    environment,
    fmt,
    interrupt_on_sigterm,
    median_table,
    plot_sweep,
    ratio_table,
    rel,
    run_interruptibly,
    stamped_paths,
)
from bench.harness.servers import (
    HA,
    Server,
    Target,
    module_argv,
    new_run,
    serving,
)
from bench.harness.statistics import (
    median_rows,
    percentiles,
    ratios_against,
)
from bench.harness.sweep import PointHook, sweep
from deployments.observability.catalog import LATENCY_BUCKETS_MS
from deployments.observability.slo import quantile

#: = deployments.observability.replica.EXPORTER_IMPORT_PATH (not imported: it imports Ray).
EXPORTER_IMPORT_PATH = "deployments.observability.replica:span_processors"
#: Variables of the shell that would change what a configuration means.
STRIPPED_PREFIXES = ("OTEL_", "PYROSCOPE_", "KEEL_PYROSCOPE_")
CONFIGS = ("off", "on", "on_sampled_1pct", "on_payloads_5pct", "on_payloads_all")
#: Payload logging (Ingress user_config.payloads) per configuration: ``on`` plus a rate.
PAYLOAD_RATES = {"on_payloads_5pct": 0.05, "on_payloads_all": 1.0}
DESCRIPTIONS = {
    "off": "Ingress metrics: false, tracing not configured",
    "on": "Ingress metrics: true, tracing on for every request (sampling ratio 1.0), "
          "OTLP/HTTP to a local counting sink",
    "on_sampled_1pct": "Ingress metrics: true, tracing with sampling ratio 0.01, OTLP/HTTP "
                       "to a local counting sink",
    "on_payloads_5pct": "as on, and payload logging of 5 % of answers to the machine's Redis",
    "on_payloads_all": "as on, and payload logging of every answer to the machine's Redis",
}
METRICS = ["rps", "p50_ms", "p95_ms", "p99_ms", "error_rate", "mean_batch", "spans_per_s",
           "spans_per_request"]
#: Labels Ray adds to every series; left out of the saved scrape.
NOISY_LABELS = ("Component", "SessionName", "WorkerId", "NodeAddress", "JobId", "Version",
                "otel_scope_name", "otel_scope_schema_url", "otel_scope_version")
#: ray_serve_* series kept in the scrape file (besides every ray_keel_* one).
SERVE_SERIES = re.compile(r"^ray_serve_(num_http_requests_total|deployment_request_counter_total"
                          r"|deployment_processing_latency_ms_(count|sum)"
                          r"|num_router_requests_total|replica_processing_queries"
                          r"|deployment_replica_healthy|num_ongoing_http_requests"
                          r"|request_router_queue_len|http_request_latency_ms_(count|sum))\b")


# --------------------------------------------------------------------------- the sink


class Sink:
    """``harness.otlp_sink`` in its own process (its own session, stopped by pid)."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            module_argv("otlp_sink", "--port", str(self.port)),
            cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 20
        while self.stats() is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the OTLP sink did not start; log: {log_path}")
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def stats(self) -> dict[str, Any] | None:
        status, text = http_get_full(f"http://127.0.0.1:{self.port}/stats", 3.0)
        if status == 200:
            with contextlib.suppress(ValueError):
                document: dict[str, Any] = json.loads(text)
                return document
        return None

    def spans(self) -> int:
        stats = self.stats()
        return int(stats["spans"]) if stats else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# --------------------------------------------------------------------------- servers


def make_target(name: str, sink_url: str) -> Target:
    env = dict(HA)
    if name != "off":
        env.update({
            "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": EXPORTER_IMPORT_PATH,
            "RAY_SERVE_TRACING_SAMPLING_RATIO": "0.01" if name == "on_sampled_1pct" else "1.0",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink_url,
        })
    return Target(name, "keel", DESCRIPTIONS[name], env=env)


def ingress_user_config(name: str) -> dict[str, Any]:
    """The Ingress's user_config under configuration ``name`` (the cache off throughout)."""
    config: dict[str, Any] = {"metrics": name != "off", "cache": {"enabled": False}}
    if name in PAYLOAD_RATES:
        config["payloads"] = {"rate": PAYLOAD_RATES[name]}
    return config


class ObsServer(Server):
    """A ``Server`` with Keel's observability switched by the configuration."""

    def __init__(self, target: Target, args: argparse.Namespace, log_path: Path) -> None:
        super().__init__(target, args, log_path)
        self.metrics_port = free_port()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in super()._env().items()
               if not k.startswith(STRIPPED_PREFIXES) or k in self.target.env}
        return env

    def _argv(self) -> list[str]:
        ingress = ingress_user_config(self.target.name)
        return [*super()._argv(), "--ingress-user-config", json.dumps(ingress),
                "--metrics-export-port", str(self.metrics_port)]

    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.load_port}"

    def scrape(self, timeout: float = 10.0) -> str | None:
        status, text = http_get_full(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout)
        return text if status == 200 else None


# --------------------------------------------------------------------------- the SLO check


async def timed_load(url: str, concurrency: int, seconds: float, bodies: list[bytes],
                     request_timeout_s: float) -> list[tuple[float, float, int]]:
    """Closed-loop load for ``seconds``; every answer as (done wall time, latency s, status)."""
    records: list[tuple[float, float, int]] = []
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    end = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        index = offset
        while time.perf_counter() < end:
            body = bodies[index % len(bodies)]
            index += concurrency
            sent = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, OSError):
                status = 0
                await asyncio.sleep(0.01)
            done = time.perf_counter()
            records.append((time.time(), done - sent, status))

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return records


def client_figures(records: list[tuple[float, float, int]], since: float,
                   until: float) -> dict[str, Any]:
    """Count and percentiles of the answers that completed in ``[since, until]``."""
    chosen = [(lat, st) for done, lat, st in records if since <= done <= until]
    ok_ms = np.asarray([lat * 1000 for lat, st in chosen if st == 200])
    out: dict[str, Any] = {"requests": len(chosen), "ok": int(ok_ms.size),
                           "errors": len(chosen) - int(ok_ms.size)}
    if ok_ms.size:
        out.update(percentiles(ok_ms), mean_ms=float(ok_ms.mean()))
        # The same latencies through the server's buckets and interpolation: how much of
        # a difference is the histogram's resolution rather than time spent elsewhere.
        buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        for value in np.searchsorted(LATENCY_BUCKETS_MS, ok_ms, side="left"):
            buckets[int(value)] += 1
        out["bucketed_p50_ms"] = quantile(buckets, 0.50)
        out["bucketed_p95_ms"] = quantile(buckets, 0.95)
    return out


def slo_window(report: dict[str, Any], name: str, window: str = "1m") -> dict[str, Any]:
    for objective in report.get("objectives", []):
        if objective["name"] == name:
            result: dict[str, Any] = objective["windows"].get(window, {})
            return result
    return {}


# --------------------------------------------------------------------------- the scrape


_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_scrape(text: str) -> list[tuple[str, dict[str, str], float]]:
    series = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match.group(2) or ""))
        with contextlib.suppress(ValueError):
            series.append((match.group(1), labels, float(match.group(3))))
    return series


def filtered_scrape(text: str) -> str:
    """``ray_keel_*`` lines and a few ``ray_serve_*`` ones, without Ray's noisy labels."""
    out = []
    for name, labels, value in parse_scrape(text):
        if not (name.startswith("ray_keel_") or SERVE_SERIES.match(name)):
            continue
        if name.endswith("_bucket") and not name.startswith("ray_keel_"):
            continue
        kept = {k: v for k, v in labels.items() if k not in NOISY_LABELS}
        label_text = ",".join(f'{k}="{v}"' for k, v in sorted(kept.items()))
        out.append(f"{name}{{{label_text}}} {value:g}" if kept else f"{name} {value:g}")
    return "\n".join(sorted(out)) + "\n"


def total(series: list[tuple[str, dict[str, str], float]], name: str,
          **match: str) -> float | None:
    values = [v for n, labels, v in series if n == name
              and all(labels.get(k) == want for k, want in match.items())]
    return sum(values) if values else None


def scrape_checks(text: str, model: str, sent: dict[str, int]) -> dict[str, Any]:
    """The scrape's figures next to what the client sent."""
    series = parse_scrape(text)
    route = "/v2/models/{model_name}/infer"
    requests = total(series, "ray_keel_requests_total", model=model)
    requests_infer_route = total(series, "ray_keel_requests_total", http_route=route)
    latency_count = total(series, "ray_keel_request_latency_ms_count", model=model)
    batch_sum = total(series, "ray_keel_model_batch_size_sum", model=model)
    batch_count = total(series, "ray_keel_model_batch_size_count", model=model)
    model_latency_count = total(series, "ray_keel_model_latency_ms_count", model=model)
    slo = {}
    for n, labels, v in series:
        if n == "ray_keel_slo_value" and labels.get("window") == "1m":
            slo[labels.get("slo", "?")] = v
    events = {labels.get("slo", "?"): v for n, labels, v in series
              if n == "ray_keel_slo_events" and labels.get("window") == "1m"}
    names = sorted({n for n, _, _ in series if n.startswith("ray_keel_")})
    return {
        "keel_series_names": names,
        "requests_total_model": requests,
        "requests_total_infer_route": requests_infer_route,
        "request_latency_count_model": latency_count,
        "model_latency_count": model_latency_count,
        "model_batch_count": batch_count,
        "model_batch_mean": (batch_sum / batch_count) if batch_sum and batch_count else None,
        "slo_value_1m": slo, "slo_events_1m": events,
        "client_sent_infer": sent.get("infer"),
        "requests_vs_sent": (requests / sent["infer"])
        if requests is not None and sent.get("infer") else None,
        "statuses": {labels.get("status", "?"): v for n, labels, v in series
                     if n == "ray_keel_requests_total" and labels.get("model") == model},
    }


def slo_phase(server: ObsServer, args: argparse.Namespace, bodies: list[bytes],
              sent: dict[str, int], scrape_path: Path) -> dict[str, Any]:
    """60 s at c=8, then /v1/slo at once; Ray's metrics scraped during and after."""
    url = server.infer_url()
    phase: dict[str, Any] = {"concurrency": args.slo_concurrency,
                             "duration_s": args.slo_duration, "warmup_s": args.slo_warmup}
    scrapes: dict[str, Any] = {}

    def scrape_during() -> None:
        scrapes["during_at"] = time.time()
        scrapes["during"] = server.scrape()

    timer = threading.Timer(args.slo_warmup + args.slo_duration / 2, scrape_during)
    timer.start()
    started = time.time()
    try:
        records = asyncio.run(timed_load(url, args.slo_concurrency,
                                         args.slo_warmup + args.slo_duration, bodies,
                                         args.request_timeout))
    finally:
        timer.join()
    load_ended = time.time()
    status, text = http_get_full(f"{server.base_url()}/v1/slo")
    queried = time.time()
    sent["infer"] = sent.get("infer", 0) + len(records)
    phase.update(started_at=started, load_ended_at=load_ended, slo_queried_at=queried,
                 slo_status=status, requests_sent=len(records))
    if status != 200:
        phase["slo_error"] = text[:500]
        return phase
    first = json.loads(text)
    evaluated = float(first["evaluated_at"])
    # SloBook.merged: slots with second > int(now) - 60, i.e. events observed at or
    # after int(now) - 59 (a 59.x s window ending at evaluated_at).
    window_start = math.floor(evaluated) - 59
    phase["slo_report"] = first
    phase["server_window"] = {"start": window_start, "end": evaluated,
                              "seconds": round(evaluated - window_start, 2)}
    phase["server"] = {name: slo_window(first, name) for name in
                       ("api_p50", "api_p95", "model_p95", "success")}
    phase["client_in_server_window"] = client_figures(records, window_start, evaluated)
    measured_from = started + args.slo_warmup
    phase["client_measured_window"] = client_figures(records, measured_from, load_ended)
    phase["client_outside_server_window"] = sum(1 for d, _, _ in records if d < window_start)
    phase["query_delay_s"] = round(queried - load_ended, 3)
    # After Ray's metrics report interval, every request of the run is in the scrape.
    time.sleep(args.scrape_settle)
    scrapes["after_at"] = time.time()
    scrapes["after"] = server.scrape()
    lines = []
    for key in ("during", "after"):
        raw = scrapes.get(key)
        at = scrapes.get(f"{key}_at")
        stamp = dt.datetime.fromtimestamp(at).isoformat(timespec="seconds") if at else "-"
        lines.append(f"# ---- scrape {key} the c={args.slo_concurrency} load, {stamp}, "
                     f"http://127.0.0.1:{server.metrics_port}/metrics "
                     f"(ray_keel_* and some ray_serve_*; labels {', '.join(NOISY_LABELS)} "
                     f"left out)")
        lines.append(filtered_scrape(raw) if raw else "# (no answer)\n")
        if raw:
            phase[f"scrape_{key}"] = scrape_checks(raw, args.model, sent)
    scrape_path.write_text("\n".join(lines))
    phase["scrape_file"] = rel(scrape_path)
    return phase


# --------------------------------------------------------------------------- runs


def span_counter(sink: Sink, sent: dict[str, int], config: str) -> PointHook:
    """Per point: the spans the sink received and the requests sent (``sweep``'s hook)."""

    def start() -> Callable[[dict[str, Any]], str]:
        spans_before, t0 = sink.spans(), time.monotonic()

        def finish(point: dict[str, Any]) -> str:
            wall = time.monotonic() - t0
            spans = sink.spans() - spans_before
            sent_here = point["requests"] + point["warmup_requests"] + point["drained_requests"]
            sent["infer"] += sent_here
            point["wall_s"] = round(wall, 2)
            point["requests_sent"] = sent_here
            point["spans"] = spans
            point["spans_per_s"] = spans / wall if config != "off" else None
            point["spans_per_request"] = (spans / sent_here if sent_here and config != "off"
                                          else None)
            return f", spans {spans} ({spans / wall:.0f}/s)"

        return finish

    return start


def run_config(target: Target, repeat: int, args: argparse.Namespace, bodies: list[bytes],
               sink: Sink, logs_dir: Path, slo_here: bool,
               scrape_path: Path, progress: Progress) -> dict[str, Any]:
    run = new_run("config", target.name, repeat)
    server = ObsServer(target, args, logs_dir / f"{target.name}-r{repeat}.log")
    sent: dict[str, int] = {"infer": 0}
    spans_start = sink.spans()
    label = f"{target.name} r{repeat}"
    progress.step(f"{label} starting")
    with serving(server, run, logs_dir, label, probe=bodies[0],
                 startup_timeout=args.startup_timeout):
        sent["infer"] += 1
        run["ports"]["metrics"] = server.metrics_port
        sweep(server, run, args, bodies, label, progress,
              span_counter(sink, sent, target.name))
        if slo_here:
            progress.step(f"{label} /v1/slo check")
            log(f"{label}: /v1/slo check, {args.slo_duration:g} s at c={args.slo_concurrency}")
            run["slo_check"] = slo_phase(server, args, bodies, sent, scrape_path)
            log(f"{label}: /v1/slo answered {run['slo_check'].get('slo_status')}")
            progress.advance(f"{label} /v1/slo check")
        run["requests_sent"] = sent["infer"]
    run["spans_total"] = sink.spans() - spans_start
    run["spans_per_request_total"] = (run["spans_total"] / sent["infer"]
                                      if sent["infer"] and target.name != "off" else None)
    log(f"{label}: spans received while it ran: {run['spans_total']}")
    return run


def summarise(runs: list[dict[str, Any]], configs: list[str],
              concurrencies: list[int]) -> dict[str, Any]:
    """Medians per (config, concurrency) over the repeats, and each config over "off"
    (over "on" for the payload configurations, or when "off" was not run)."""
    medians = median_rows(runs, "config", configs, concurrencies, METRICS)
    ratios = {}
    for name in configs:
        base = "on" if name in PAYLOAD_RATES or "off" not in configs else "off"
        if name != base and base in configs:
            ratios[f"{name}/{base}"] = ratios_against(medians, name, base)
    return {"medians": medians, "ratios": ratios}


def markdown(document: dict[str, Any], configs: list[str], concurrencies: list[int]) -> str:
    lines = median_table(
        document["medians"], configs, concurrencies,
        ["config", "c", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch",
         "spans/s", "spans/req"],
        lambda row: [fmt(row["rps"], 0), fmt(row["p50_ms"]), fmt(row["p95_ms"]),
                     fmt(row["p99_ms"]), str(row["errors"]), fmt(row["mean_batch"]),
                     fmt(row["spans_per_s"], 0), fmt(row["spans_per_request"], 2)])
    if document["ratios"]:
        lines += ["", *ratio_table(document["ratios"], point_head="c")]
    for name in (c for c in configs if c != "off"):
        values = [r["spans_per_request_total"] for r in document["runs"]
                  if r["config"] == name and r.get("spans_per_request_total")]
        rates = [p["spans_per_s"] for r in document["runs"] if r["config"] == name
                 for p in r["points"] if p.get("spans_per_s")]
        if values:
            lines.append(f"\n{name}: spans received per request sent, whole server runs "
                         f"(median): {statistics.median(values):.2f}; highest spans/s of a "
                         f"point: {max(rates):,.0f}")
    check = next((r["slo_check"] for r in document["runs"] if r.get("slo_check")), None)
    if check and check.get("server"):
        server, inside = check["server"], check["client_in_server_window"]
        measured = check["client_measured_window"]
        lines += ["", f"`/v1/slo` 1m window ({check['server_window']['seconds']} s, queried "
                      f"{check['query_delay_s']} s after the load) vs the client, "
                      f"c={check['concurrency']}:", "",
                  "| figure | /v1/slo | client, same seconds | client, same seconds "
                  "through the server's buckets | client, its own 60 s |",
                  "|---|---:|---:|---:|---:|",
                  f"| p50 ms | {fmt(server['api_p50'].get('value'), 2)} | "
                  f"{fmt(inside.get('p50_ms'), 2)} | {fmt(inside.get('bucketed_p50_ms'), 2)} | "
                  f"{fmt(measured.get('p50_ms'), 2)} |",
                  f"| p95 ms | {fmt(server['api_p95'].get('value'), 2)} | "
                  f"{fmt(inside.get('p95_ms'), 2)} | {fmt(inside.get('bucketed_p95_ms'), 2)} | "
                  f"{fmt(measured.get('p95_ms'), 2)} |",
                  f"| requests | {server['api_p50'].get('events')} | {inside['requests']} | | "
                  f"{measured['requests']} |",
                  f"| model_p95 ms | {fmt(server['model_p95'].get('value'), 2)} | | | |"]
        for key in ("scrape_during", "scrape_after"):
            scrape = check.get(key)
            if scrape:
                lines.append(f"\n{key}: ray_keel_requests_total{{model}} = "
                             f"{fmt(scrape['requests_total_model'], 0)}, latency count "
                             f"{fmt(scrape['request_latency_count_model'], 0)}, client sent "
                             f"{scrape['client_sent_infer']} in all; model batch mean "
                             f"{fmt(scrape['model_batch_mean'], 2)}; slo 1m values "
                             f"{ {k: round(v, 2) for k, v in scrape['slo_value_1m'].items()} }")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = options.parser("Keel with tracing + metrics on vs off; /v1/slo vs the client; a "
                            "scrape of Ray's metrics endpoint.")
    parser.add_argument("--configs", nargs="+", default=["off", "on"], choices=CONFIGS,
                        help="configurations, interleaved per repeat")
    options.add_sweep(parser, concurrency=[1, 8, 32], duration=8.0)
    parser.add_argument("--slo-duration", type=float, default=60.0,
                        help="s of load before GET /v1/slo (0: skip the check and scrape)")
    parser.add_argument("--slo-warmup", type=float, default=3.0,
                        help="s of load before the --slo-duration")
    parser.add_argument("--slo-concurrency", type=int, default=8)
    parser.add_argument("--scrape-settle", type=float, default=12.0,
                        help="s to wait after the load before the last scrape (Ray reports "
                             "metrics every 10 s)")
    options.add_servers(parser, pool=True)
    return options.finish(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()
    if not (args.repository / args.model).is_dir():
        log(f"{args.repository / args.model} does not exist: run `.venv/bin/keel prepare`")
        return 2
    install_fast_loop()
    json_path, logs_dir = stamped_paths(args.out, "observability")
    logs_dir.mkdir(parents=True)
    scrape_path = json_path.with_name(json_path.name.replace("-observability.json",
                                                             "-metrics-scrape.txt"))
    bodies = make_bodies(pool=args.pool, seed=args.seed)
    sink = Sink(logs_dir / "otlp-sink.log")
    targets = {name: make_target(name, sink.url) for name in args.configs}
    slo_config = "on" if "on" in args.configs else next(
        (c for c in args.configs if c != "off"), None)

    def summary(document: dict[str, Any]) -> dict[str, Any]:
        return {**summarise(document["runs"], args.configs, args.concurrency),
                "sink": sink.stats()}

    document = RunDocument(
        json_path, args, summary,
        configs={n: {"description": DESCRIPTIONS[n],
                     "env": dict(targets[n].env.items()),
                     "ingress_user_config": ingress_user_config(n)}
                 for n in args.configs},
        environment=environment(), sink_url=sink.url)

    def measure() -> None:
        total = args.repeats * len(args.configs) * len(args.concurrency) + (
            1 if slo_config is not None and args.slo_duration > 0 else 0)
        with Progress("observability", total) as progress:
            for repeat in range(1, args.repeats + 1):
                for name in args.configs if repeat % 2 else list(reversed(args.configs)):
                    # The /v1/slo check and the scrape: on the last repeat's `on` server,
                    # after its sweep.
                    slo_here = (repeat == args.repeats and name == slo_config
                                and args.slo_duration > 0)
                    document["runs"].append(run_config(targets[name], repeat, args, bodies,
                                                       sink, logs_dir, slo_here, scrape_path,
                                                       progress))
                    document.save()

    try:
        interrupted = run_interruptibly(measure)
    finally:
        document.save()
        sink.stop()
    png_path = json_path.with_suffix(".png")
    title = (f"{args.model}, Keel (HAProxy, throughput-optimised), observability on vs off, "
             f"{os.cpu_count()} CPUs shared with the load generator, "
             f"{args.duration:g} s per point, median of {args.repeats}")
    plot_sweep(document.data, args.configs, png_path, title,
               style=lambda name: "--" if name == "off" else "-", log_y=False)
    print(markdown(document.data, args.configs, args.concurrency))
    log(f"wrote {rel(json_path)}, {rel(png_path)}"
        + (f", {rel(scrape_path)}" if scrape_path.exists() else "")
        + f" in {document['elapsed_s']} s; server logs in {rel(logs_dir)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
