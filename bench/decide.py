"""``POST /v1/decide`` side by side: Keel (as ``make demo`` runs it) and one FastAPI process.

Servers:

- ``keel``: ``serve run serve_config.yaml`` (``harness.keel_server``) with
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1``, load to the
  HTTP port (HAProxy -> Ingress -> FeatureService / Redis / OnnxModel); the
  Ingress's cache key prefix is changed to ``keelbench:keel:``;
- ``baseline_decide``: ``harness.baseline_decide``, Keel's cores (FeatureFetcher,
  PredictionCache, Predictor, ModelVersions) in one uvicorn process, key prefix
  ``keelbench:baseline:``.

Workloads (``harness.decide_load``): ``hit`` (a warmed pool), ``miss`` (every pair
once, cache emptied first), ``zipf`` (truncated Zipf over symbols and accounts,
cache emptied first), each at every ``--concurrency`` with one entity per
request, plus each at ``--batch-concurrency`` with ``--batch`` entities per
request. Before every point the benchmark deletes that server's keys
(SCAN + UNLINK on its own prefix only; never FLUSHDB). For each repeat, each
server in turn (the order alternates between repeats) is started, swept and
stopped completely. Writes ``results/<timestamp>-decide.json`` and ``.png`` and
prints the markdown tables of medians, ratios and the targets' verdicts.

    .venv/bin/python -m bench.decide                     # the full default run (~18 min)
    .venv/bin/python -m bench.decide --repeats 1 --duration 3 --warmup 1 \
        --concurrency 1 8 --batch 0                      # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import options, report
from bench.harness.cache_keys import delete_prefix, redis_client
from bench.harness.decide_load import WORKLOADS, Workload, make_workload, run_decide_load
from bench.harness.http_load import install_fast_loop
from bench.harness.network import http_get
from bench.harness.progress import Progress, log
from bench.harness.report import (
    REPO_ROOT,
    RunDocument,
    environment,
    fmt,
    interrupt_on_sigterm,
    rel,
    run_interruptibly,
    stamped_paths,
)
from bench.harness.servers import (
    HA,
    Server,
    ServerFailed,
    Target,
    check_point,
    module_argv,
    new_run,
    serving,
)
from bench.harness.statistics import batch_delta, mean_batch, median_or_none, ratios_against

SERVERS: dict[str, Target] = {t.name: t for t in [
    Target("keel", "keel",
           "serve_config.yaml as `make demo` runs it: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
           "RAY_SERVE_ENABLE_HA_PROXY=1, load to the HTTP port (HAProxy)", env=HA),
    Target("baseline_decide", "baseline_decide",
           "one uvicorn process: Keel's FeatureFetcher, PredictionCache, Predictor and "
           "ModelVersions called in-line, no Ray"),
]}
KEY_PREFIXES = {"keel": "keelbench:keel:", "baseline_decide": "keelbench:baseline:"}
TARGETS = {"api_p50_ms": 25.0, "api_p95_ms": 80.0, "model_p95_ms": 50.0, "zipf_hit_ratio": 0.30}
METRICS = ["rps", "eps", "p50_ms", "p95_ms", "p99_ms", "error_rate", "hit_ratio",
           "hit_ratio_all", "server_hit_ratio", "model_called_p95", "mean_batch_model",
           "mean_batch_features"]
STAGES = ["features", "cache", "model", "total"]


# --------------------------------------------------------------------------- servers


class DecideServer(Server):
    """A ``Server``, probed and loaded on ``/v1/decide``, with its own key prefix."""

    def __init__(self, target: Target, args: argparse.Namespace, log_path: Path) -> None:
        super().__init__(target, args, log_path)
        self.key_prefix = KEY_PREFIXES[target.name]

    def _argv(self) -> list[str]:
        a = self.args
        if self.target.kind == "keel":
            return [*super()._argv(), "--ingress-user-config",
                    json.dumps({"cache": {"key_prefix": self.key_prefix}})]
        return module_argv("baseline_decide", "--repository", str(a.repository),
                           "--feature-repo", str(a.feature_repo),
                           "--key-prefix", self.key_prefix, "--host", "127.0.0.1",
                           "--port", str(self.port),
                           *([] if a.access_log else ["--no-access-log"]))

    def infer_url(self) -> str:
        return f"http://127.0.0.1:{self.load_port}/v1/decide"

    def cache_counters(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            status, text = http_get(f"http://127.0.0.1:{self.load_port}/v1/cache", 5.0)
            if status == 200:
                document: dict[str, Any] = json.loads(text)
                return document
        return None


def counter_delta(before: dict[str, Any] | None, after: dict[str, Any] | None,
                  model: str) -> dict[str, Any] | None:
    """The cache counters of ``model`` between two ``GET /v1/cache`` answers."""
    if not before or not after:
        return None
    old = before.get("models", {}).get(model, {})
    new = after.get("models", {}).get(model, {})
    delta: dict[str, Any] = {k: int(new.get(k, 0)) - int(old.get(k, 0))
                             for k in ("hits", "misses", "shared")}
    delta["errors"] = int(after.get("errors", 0)) - int(before.get("errors", 0))
    delta["remote"] = after.get("remote")
    total = delta["hits"] + delta["shared"] + delta["misses"]
    delta["hit_ratio"] = (delta["hits"] + delta["shared"]) / total if total else None
    return delta


# --------------------------------------------------------------------------- runs


def plan(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(workload, entities per request, concurrency) of every point, in order."""
    points = [(w, 1, c) for w in args.workloads for c in args.concurrency]
    if args.batch > 1:
        points += [(w, args.batch, args.batch_concurrency) for w in args.workloads]
    return points


def point_key(workload: str, batch: int, concurrency: int) -> str:
    return f"{workload}|{batch}|{concurrency}"


def prepare_point(server: DecideServer, client: Any, workload: Workload,
                  model: str) -> dict[str, Any]:
    """Empty this server's keys; for ``hit``, warm the pool and check it answers hits."""
    info: dict[str, Any] = {"deleted_keys": delete_prefix(client, server.key_prefix)}
    if workload.pool:
        entities = [{"symbol": s, "account_id": a} for s, a in workload.pool]
        body = json.dumps({"model": model, "entities": entities}).encode()
        statuses = []
        for _ in range(2):
            request = urllib.request.Request(server.infer_url(), data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30.0) as resp:
                    answer = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                raise ServerFailed(f"warming the hit pool answered {exc.code}: "
                                   f"{exc.read(300)!r}") from exc
            statuses = [r["cache"] for r in answer["results"]]
        info["warm_check"] = {s: statuses.count(s) for s in sorted(set(statuses))}
    return info


def run_points(server: DecideServer, run: dict[str, Any], args: argparse.Namespace,
               client: Any, workloads: dict[tuple[str, int], Workload], label: str,
               progress: Progress) -> None:
    """Every point of ``plan`` against a ready server."""
    for workload_name, batch, concurrency in plan(args):
        name = f"{label} {workload_name} b={batch} c={concurrency}"
        progress.step(name)
        workload = workloads[(workload_name, batch)]
        prepared = prepare_point(server, client, workload, args.model)
        counters_before = server.cache_counters()
        stats_before = server.stats() if args.stats else None
        result = asyncio.run(run_decide_load(server.infer_url(), workload, concurrency,
                                             args.duration, args.warmup,
                                             args.request_timeout))
        point = result.to_dict()
        point["prepare"] = prepared
        stats_after = server.stats() if args.stats else None
        point["server_cache"] = counter_delta(counters_before, server.cache_counters(),
                                              args.model)
        point["server_hit_ratio"] = (point["server_cache"] or {}).get("hit_ratio")
        point["mean_batch_model"] = mean_batch(batch_delta(stats_before, stats_after,
                                                           args.model))
        point["mean_batch_features"] = mean_batch(batch_delta(stats_before, stats_after,
                                                              "FeatureService"))
        point["replicas"] = (stats_after or {}).get("replicas")
        run["points"].append(point)
        hits = (f"{100 * point['hit_ratio']:.0f} %" if point["hit_ratio"] is not None
                else "-")
        log(f"{name}: {point['rps']:.0f} rps, p95 {fmt(point['p95_ms'])} ms, hits {hits}, "
            f"errors {point['errors']}, server ms {point['timings_p50']}")
        progress.advance(name)
        check_point(server, point, label)


def run_server(target: Target, repeat: int, args: argparse.Namespace, client: Any,
               workloads: dict[tuple[str, int], Workload], logs_dir: Path,
               progress: Progress) -> dict[str, Any]:
    """Start one server, run every point, stop it; everything it measured."""
    run = new_run("server", target.name, repeat)
    server = DecideServer(target, args, logs_dir / f"{target.name}-r{repeat}.log")
    run["key_prefix"] = server.key_prefix
    probe = json.dumps({"model": args.model, "entities": [
        {"symbol": "SYM000", "account_id": "ACC0000"}]}).encode()
    label = f"{target.name} r{repeat}"
    progress.step(f"{label} starting")
    with serving(server, run, logs_dir, label, probe=probe,
                 startup_timeout=args.startup_timeout,
                 on_stop=lambda: delete_prefix(client, server.key_prefix)):
        run_points(server, run, args, client, workloads, label, progress)
    for _ in range(len(plan(args)) - len(run["points"])):
        progress.advance(f"{label} skipped")
    return run


# --------------------------------------------------------------------------- summary


def summarise(runs: list[dict[str, Any]], servers: list[str],
              points: list[tuple[str, int, int]]) -> dict[str, Any]:
    """Medians per (server, point) over the repeats; Keel / baseline ratios; verdicts."""
    medians: dict[str, dict[str, dict[str, Any]]] = {}
    for name in servers:
        medians[name] = {}
        for workload, batch, concurrency in points:
            found = [p for r in runs if r["server"] == name for p in r["points"]
                     if (p["workload"], p["batch"], p["concurrency"])
                     == (workload, batch, concurrency)]
            if not found:
                continue
            row: dict[str, Any] = {"n": len(found), "workload": workload, "batch": batch,
                                   "concurrency": concurrency}
            for metric in METRICS:
                row[metric] = median_or_none([p.get(metric) for p in found])
            row["errors"] = sum(p["errors"] for p in found)
            # Redis commands that failed (socket timeout 0.1 s): the in-process fallback
            # answered for the next retry_after_s, so those rows were misses.
            row["redis_errors"] = sum((p.get("server_cache") or {}).get("errors", 0)
                                      for p in found)
            row["timings_p50"] = {s: median_or_none([p["timings_p50"].get(s) for p in found])
                                  for s in STAGES}
            row["timings_p95"] = {s: median_or_none([p["timings_p95"].get(s) for p in found])
                                  for s in STAGES}
            row["wrapped"] = any(p["bodies_sent"] > p["bodies_available"] for p in found)
            medians[name][point_key(workload, batch, concurrency)] = row
    ratios: dict[str, dict[str, Any]] = {}
    if "keel" in medians and "baseline_decide" in medians:
        ratios = ratios_against(medians, "keel", "baseline_decide")
    return {"medians": medians, "ratios": ratios,
            "verdicts": verdicts(medians, servers, points)}


def verdicts(medians: dict[str, dict[str, dict[str, Any]]], servers: list[str],
             points: list[tuple[str, int, int]]) -> dict[str, dict[str, Any]]:
    """Per server and target: the one-entity points (workload, concurrency) that meet it."""
    out: dict[str, dict[str, Any]] = {}
    singles = [(w, c) for w, b, c in points if b == 1]
    for name in servers:
        rows = medians.get(name, {})

        def met(check: Any, workloads: tuple[str, ...] = WORKLOADS,
                rows: dict[str, dict[str, Any]] = rows) -> dict[str, list[int]]:
            result: dict[str, list[int]] = {}
            for w, c in singles:
                row = rows.get(point_key(w, 1, c))
                if w in workloads and row is not None and check(row):
                    result.setdefault(w, []).append(c)
            return result

        out[name] = {
            "api_p50_le_25ms": met(lambda r: r["p50_ms"] is not None
                                   and r["p50_ms"] <= TARGETS["api_p50_ms"]),
            "api_p95_le_80ms": met(lambda r: r["p95_ms"] is not None
                                   and r["p95_ms"] <= TARGETS["api_p95_ms"]),
            "model_p95_le_50ms": met(lambda r: r["model_called_p95"] is not None
                                     and r["model_called_p95"] <= TARGETS["model_p95_ms"],
                                     ("miss", "zipf")),
            "zipf_hit_ratio_ge_30pct": met(lambda r: r["hit_ratio"] is not None
                                           and r["hit_ratio"] >= TARGETS["zipf_hit_ratio"],
                                           ("zipf",)),
            "measured_concurrencies": sorted({c for _, c in singles}),
        }
    return out


def markdown(summary: dict[str, Any], servers: list[str],
             points: list[tuple[str, int, int]]) -> str:
    def pct(value: Any) -> str:
        return "-" if value is None else f"{100 * value:.0f} %"

    lines = ["| workload | entities/req | c | server | req/s | p50 ms | p95 ms | p99 ms | "
             "errors | Redis errors | hit ratio | server features | cache | model | total | "
             "model p95 (called) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workload, batch, concurrency in points:
        for name in servers:
            row = summary["medians"].get(name, {}).get(point_key(workload, batch, concurrency))
            if row is None:
                lines.append(f"| {workload} | {batch} | {concurrency} | {name} | failed "
                             f"| | | | | | | | | | | |")
                continue
            t = row["timings_p50"]
            hits = pct(row["hit_ratio"]) + (" (wrapped)" if row["wrapped"] and
                                             workload == "miss" else "")
            lines.append(
                f"| {workload} | {batch} | {concurrency} | {name} | {fmt(row['rps'], 0)} | "
                f"{fmt(row['p50_ms'])} | {fmt(row['p95_ms'])} | {fmt(row['p99_ms'])} | "
                f"{row['errors']} | {row['redis_errors']} | {hits} | {fmt(t['features'], 2)} | "
                f"{fmt(t['cache'], 2)} | "
                f"{fmt(t['model'], 2)} | {fmt(t['total'], 2)} | "
                f"{fmt(row['model_called_p95'], 2)} |")
    if summary["ratios"]:
        lines += ["", "| keel / baseline_decide | entities/req | c | req/s | p50 | p95 | p99 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for workload, batch, concurrency in points:
            row = summary["ratios"].get(point_key(workload, batch, concurrency))
            if row:
                lines.append(f"| {workload} | {batch} | {concurrency} | {fmt(row['rps'], 2)} | "
                             f"{fmt(row['p50_ms'], 2)} | {fmt(row['p95_ms'], 2)} | "
                             f"{fmt(row['p99_ms'], 2)} |")
    zipf = [(b, c) for w, b, c in points if w == "zipf"]
    if zipf:
        lines += ["", "| zipf hit ratio | entities/req | c | window (responses) | "
                  "from empty (all responses) | server counters (/v1/cache) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for batch, concurrency in zipf:
            for name in servers:
                row = summary["medians"].get(name, {}).get(point_key("zipf", batch,
                                                                     concurrency))
                if row:
                    lines.append(f"| {name} | {batch} | {concurrency} | {pct(row['hit_ratio'])} "
                                 f"| {pct(row['hit_ratio_all'])} | "
                                 f"{pct(row['server_hit_ratio'])} |")
    lines += ["", "| target | server | met at (workload: concurrencies) |", "|---|---|---|"]
    for name, checks in summary["verdicts"].items():
        for check, met in checks.items():
            if check == "measured_concurrencies":
                continue
            text = "; ".join(f"{w}: {', '.join(map(str, cs))}" for w, cs in met.items())
            lines.append(f"| {check} | {name} | {text or 'nowhere'} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], servers: list[str], workloads: list[str],
         path: Path, title: str) -> None:
    """req/s and p95 against concurrency per workload (one entity per request)."""
    plt = report.pyplot()
    fig, axes = plt.subplots(2, len(workloads), figsize=(5 * len(workloads), 8), squeeze=False)
    for col, workload in enumerate(workloads):
        ax_rps, ax_p95 = axes[0][col], axes[1][col]
        xs_all: set[int] = set()
        for name in servers:
            rows = [r for r in summary["medians"].get(name, {}).values()
                    if r["workload"] == workload and r["batch"] == 1]
            rows.sort(key=lambda r: r["concurrency"])
            if not rows:
                continue
            xs = [r["concurrency"] for r in rows]
            xs_all.update(xs)
            style = "-" if name == "keel" else "--"
            ax_rps.plot(xs, [r["rps"] for r in rows], style, marker="o", label=name)
            ax_p95.plot(xs, [r["p95_ms"] if r["p95_ms"] is not None else float("nan")
                             for r in rows], style, marker="o", label=name)
        ax_p95.axhline(TARGETS["api_p95_ms"], color="grey", linestyle=":", linewidth=1,
                       label="p95 target 80 ms")
        report.concurrency_axes([(ax_rps, "requests/s (median, log)"),
                                 (ax_p95, "p95 latency, ms (median, log)")], sorted(xs_all))
        ax_rps.set_title(f"/v1/decide, workload {workload}")
        if ax_p95.lines:
            ax_p95.legend(fontsize=8)
    report.save_figure(fig, path, title)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = options.parser(
        "POST /v1/decide: Keel vs one FastAPI process with Keel's cores.",
        epilog="servers: " + "; ".join(f"{t.name}: {t.description}" for t in SERVERS.values()))
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    options.add_sweep(parser, concurrency=[1, 8, 32, 64], duration=8.0)
    parser.add_argument("--batch", type=int, default=16,
                        help="entities per request of the batch points (0 or 1: none)")
    parser.add_argument("--batch-concurrency", type=int, default=8)
    parser.add_argument("--hit-pool", type=int, default=64, help="pairs of the hit workload")
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--feature-repo", type=Path, default=REPO_ROOT / "configs" / "feast")
    parser.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=True,
                        help="build the demo models and the feature store first (fast "
                             "no-ops when up to date)")
    parser.add_argument("--stats", action=argparse.BooleanOptionalAction, default=True,
                        help="read Keel's batch sizes before and after each point")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="uvicorn's access log in the baseline (its default)")
    options.add_servers(parser, repository="model repository of the baseline (Keel reads the "
                                           "one in its config)",
                        config="Keel's serve config (port and cache key prefix replaced)")
    return options.finish(parser, argv, concurrencies=("concurrency", "batch_concurrency"))


def prepare(args: argparse.Namespace) -> None:
    from graph.demo.build import build_demo_repository
    from graph.demo.feast_store import prepare_feature_store

    started = time.monotonic()
    build_demo_repository(args.repository)
    prepared = prepare_feature_store(args.feature_repo)
    log(f"prepared in {time.monotonic() - started:.1f} s: {prepared.describe()}")


def repeat_workloads(args: argparse.Namespace, repeat: int) -> dict[tuple[str, int], Workload]:
    """The bodies of every (workload, entities per request) of one repeat: seed + repeat,
    the same for both servers."""
    return {(w, b): make_workload(w, model=args.model, batch=b, seed=args.seed + repeat,
                                  hit_pool=args.hit_pool, zipf_s=args.zipf_s)
            for w, b, _ in plan(args)}


def run_repeat(repeat: int, args: argparse.Namespace, client: Any, servers: list[str],
               workloads: dict[tuple[str, int], Workload], logs_dir: Path,
               progress: Progress, on_run: Any = None) -> list[dict[str, Any]]:
    """Each server in turn (the order alternates between repeats); their runs."""
    runs = []
    for name in servers if repeat % 2 else list(reversed(servers)):
        runs.append(run_server(SERVERS[name], repeat, args, client, workloads, logs_dir,
                               progress))
        if on_run is not None:
            on_run(runs[-1])
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()
    if args.prepare:
        prepare(args)
    client = redis_client()
    client.ping()
    install_fast_loop()
    json_path, logs_dir = stamped_paths(args.out, "decide")
    logs_dir.mkdir(parents=True)
    points = plan(args)
    document = RunDocument(
        json_path, args, lambda d: summarise(d["runs"], args.servers, points),
        servers={n: SERVERS[n].description for n in args.servers},
        key_prefixes={n: KEY_PREFIXES[n] for n in args.servers},
        targets=TARGETS, environment=environment())

    def keep(run: dict[str, Any]) -> None:
        document["runs"].append(run)
        document.save()  # partial results survive an interrupted run

    def measure() -> None:
        with Progress("decide", args.repeats * len(args.servers) * len(points)) as progress:
            for repeat in range(1, args.repeats + 1):
                workloads = repeat_workloads(args, repeat)
                document.data.setdefault("workloads", {})[str(repeat)] = {
                    f"{w}|{b}": {"bodies": len(x.bodies), "distinct_pairs": x.distinct_pairs}
                    for (w, b), x in workloads.items()}
                run_repeat(repeat, args, client, args.servers, workloads, logs_dir, progress,
                           keep)

    try:
        interrupted = run_interruptibly(measure)
    finally:
        for prefix in (KEY_PREFIXES[n] for n in args.servers):
            with contextlib.suppress(Exception):
                delete_prefix(client, prefix)
    document.save()
    png_path = json_path.with_suffix(".png")
    title = (f"POST /v1/decide ({args.model}), {os.cpu_count()} CPUs shared by servers and "
             f"load generator, {args.duration:g} s per point, median of {args.repeats}")
    plot(document.data, args.servers, args.workloads, png_path, title)
    print(markdown(document.data, args.servers, points))
    log(f"wrote {rel(json_path)} and {rel(png_path)} in {document['elapsed_s']} s; "
        f"server logs in {rel(logs_dir)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
