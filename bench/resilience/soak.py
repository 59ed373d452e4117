"""Soak: hold half of Keel's measured maximum throughput for a long time, and watch.

1. Start Keel (``serve_config.yaml`` under ``serve run``, HAProxy mode as ``make demo``
   runs it) on a private Ray instance, exactly as the ``serving_core`` scenario does.
2. Measure its maximum throughput on the soak's request mix with a short closed-loop
   probe (``--probe-concurrency`` clients for ``--probe-s``), unless ``--max-rps`` is given.
3. Send an *open-loop* load at ``--fraction`` (default 0.5) of that rate for
   ``--duration`` seconds (default 600): requests leave on schedule whether or not
   earlier ones were answered, so a slowdown shows as latency and errors, not as a
   politely lower rate. The mix: ``--decide-share`` of ``/v1/decide`` (one entity,
   Zipf-distributed ids, so the cache sees a realistic key mix) and the rest
   ``/v2/models/<model>/infer`` with distinct random rows (misses).
4. Every ``--interval`` seconds: requests sent, answered, success rate, p50/p95/p99.
5. Every ``--rss-every`` seconds (default 60) the resident memory (RSS) of every
   process of the Ray instance (replicas, HAProxy, raylet, GCS, ...). Per process, a
   least-squares growth line over the samples after ``--settle`` seconds (default 600):
   MB per 10 minutes; a process growing faster than ``--growth-limit`` (1 MB per 10
   minutes) is listed as growing. The hour-long run: ``--duration 3600``.

Writes ``<out>/<date>-soak.json`` and ``.png`` and prints a table::

    .venv/bin/python -m bench.resilience.soak                 # 10 minutes
    .venv/bin/python -m bench.resilience.soak --duration 120  # a quick look
    .venv/bin/python -m bench.resilience.soak --duration 3600 # an hour of memory
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil

from bench import serving_core
from bench.harness.decide_load import make_workload
from bench.harness.http_load import install_fast_loop, make_bodies
from bench.harness.progress import Progress, log
from bench.harness.report import REPO_ROOT, RESULTS_DIR, pyplot, save_figure
from bench.harness.servers import TARGETS, Server
from bench.harness.statistics import percentiles


@dataclass
class Window:
    """What happened to the requests *sent* in one interval."""

    start_s: float
    sent: int = 0
    ok: int = 0
    failed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        answered = self.ok + self.failed
        return {
            "t_s": round(self.start_s, 1), "sent": self.sent, "ok": self.ok,
            "failed": self.failed, "statuses": self.statuses,
            "success": round(self.ok / answered, 6) if answered else None,
            **percentiles(self.latencies_ms, digits=2),
        }


@dataclass
class Request:
    url: str
    body: bytes


class Mix:
    """The soak's request sequence: decide (Zipf entities) and infer (distinct rows)."""

    def __init__(self, base: str, model: str, decide_share: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.decide_share = decide_share
        self.decide_url = f"{base}/v1/decide"
        self.infer_url = f"{base}/v2/models/{model}/infer"
        self.decide_bodies = make_workload("zipf", model=model, seed=seed).bodies
        self.infer_bodies = make_bodies(pool=20_000, seed=seed)
        self._d = 0
        self._i = 0

    def next(self) -> Request:
        if self.rng.random() < self.decide_share:
            body = self.decide_bodies[self._d % len(self.decide_bodies)]
            self._d += 1
            return Request(self.decide_url, body)
        body = self.infer_bodies[self._i % len(self.infer_bodies)]
        self._i += 1
        return Request(self.infer_url, body)


async def _send(session: aiohttp.ClientSession, request: Request,
                timeout_s: float) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        async with session.post(request.url, data=request.body,
                                headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as answer:
            await answer.read()
            status = answer.status
    except (aiohttp.ClientError, TimeoutError):
        status = 0  # no answer at all: connection refused or reset, or timed out
    return status, (time.perf_counter() - started) * 1000


async def probe(mix: Mix, concurrency: int, duration_s: float, timeout_s: float) -> float:
    """Closed loop: the answered-OK rate with ``concurrency`` clients (the maximum)."""
    ok = 0
    deadline = time.monotonic() + duration_s
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client() -> None:
            nonlocal ok
            while time.monotonic() < deadline:
                status, _ = await _send(session, mix.next(), timeout_s)
                ok += status == 200
        await asyncio.gather(*(client() for _ in range(concurrency)))
    return ok / duration_s


async def soak(mix: Mix, rate: float, duration_s: float, interval_s: float,
               timeout_s: float, on_window: Any) -> list[Window]:
    """Open loop at ``rate`` req/s for ``duration_s``; one Window per ``interval_s``."""
    windows: list[Window] = []
    pending: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(request: Request, window: Window) -> None:
            status, latency = await _send(session, request, timeout_s)
            window.statuses[str(status)] = window.statuses.get(str(status), 0) + 1
            if status == 200:
                window.ok += 1
                window.latencies_ms.append(latency)
            else:
                window.failed += 1

        began = time.monotonic()
        sent = 0
        reported = 0
        while True:
            now = time.monotonic() - began
            if now >= duration_s:
                break
            index = int(now // interval_s)
            while len(windows) <= index:
                windows.append(Window(start_s=len(windows) * interval_s))
            # Requests due by now (the schedule, not the answers, sets the pace).
            due = int(now * rate) - sent
            for _ in range(max(0, due)):
                task = asyncio.create_task(one(mix.next(), windows[index]))
                pending.add(task)
                task.add_done_callback(pending.discard)
                windows[index].sent += 1
                sent += 1
            # Report a window once its requests had time to be answered.
            while reported < index - 1 or (reported < index and now - index * interval_s
                                           > min(timeout_s, interval_s / 2)):
                on_window(windows[reported])
                reported += 1
            await asyncio.sleep(0.002)
        if pending:
            await asyncio.wait(pending, timeout=timeout_s + 5)
        for window in windows[reported:]:
            on_window(window)
    return windows


def ray_processes(server: Server) -> dict[str, dict[str, Any]]:
    """RSS of every process of the server's Ray instance, keyed by pid."""
    server._remember_processes()
    out: dict[str, dict[str, Any]] = {}
    for pid, proc in sorted(server._known.items()):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.cmdline()
            if cmdline and cmdline[0].startswith("ray::"):
                name = cmdline[0].split(".")[0]  # the actor, not the method it runs now
            else:
                # A server started as `python -m bench.harness.<module>`, or a script.
                scripts = [Path(a).name for a in cmdline[1:3]
                           if a.endswith(".py") or a.startswith("bench.")]
                name = " ".join([proc.name(), *scripts])
            out[str(pid)] = {"pid": pid, "name": name,
                             "rss_mb": round(proc.memory_info().rss / 2**20, 1)}
    return out


def memory_table(start: dict[str, dict[str, Any]],
                 end: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(set(start) | set(end), key=int):
        a, b = start.get(key), end.get(key)
        name = (a or b or {}).get("name", key)
        rows.append({"process": name, "pid": (a or b or {}).get("pid"),
                     "start_mb": a["rss_mb"] if a else None,
                     "end_mb": b["rss_mb"] if b else None,
                     "delta_mb": round(b["rss_mb"] - a["rss_mb"], 1) if a and b else None})
    return rows


class MemorySampler:
    """Samples :func:`ray_processes` every ``every_s`` seconds on its own thread (so the
    load generator's loop never waits for the process walk)."""

    def __init__(self, server: Server, every_s: float) -> None:
        self.server = server
        self.every_s = every_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._began = 0.0

    def _run(self) -> None:
        while True:
            self.samples.append({"t_s": round(time.monotonic() - self._began, 1),
                                 "processes": ray_processes(self.server)})
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> MemorySampler:
        self._began = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append({"t_s": round(time.monotonic() - self._began, 1),
                             "processes": ray_processes(self.server)})


def growth_lines(samples: list[dict[str, Any]], settle_s: float,
                 limit_mb_per_10min: float) -> list[dict[str, Any]]:
    """Per process: RSS first/last and a least-squares line over the samples taken after
    ``settle_s`` (MB per 10 minutes); ``growing`` when the slope exceeds the limit. A
    process with fewer than three settled samples (it came or went) gets no line."""
    series: dict[str, list[tuple[float, float]]] = {}
    names: dict[str, str] = {}
    for sample in samples:
        for key, proc in sample["processes"].items():
            series.setdefault(key, []).append((sample["t_s"], proc["rss_mb"]))
            names[key] = proc["name"]
    rows = []
    for key in sorted(series, key=int):
        points = series[key]
        settled = [(t, mb) for t, mb in points if t >= settle_s]
        slope = None
        if len(settled) >= 3:
            t = np.array([p[0] for p in settled])
            mb = np.array([p[1] for p in settled])
            slope = round(float(np.polyfit(t, mb, 1)[0]) * 600, 2)
        rows.append({"process": names[key], "pid": int(key), "samples": len(points),
                     "first_mb": points[0][1], "last_mb": points[-1][1],
                     "settled_min_mb": min((mb for _, mb in settled), default=None),
                     "settled_max_mb": max((mb for _, mb in settled), default=None),
                     "mb_per_10min": slope,
                     "growing": slope is not None and slope > limit_mb_per_10min})
    return rows


def plot_memory(document: dict[str, Any], path: Path) -> None:
    """RSS over time, one line per process (the twelve largest), and the settle line."""
    plt = pyplot()
    samples = document["memory_samples"]
    largest = sorted(document["memory_growth"], key=lambda r: -r["last_mb"])[:12]
    fig, ax = plt.subplots(figsize=(10, 6))
    for row in largest:
        key = str(row["pid"])
        points = [(s["t_s"] / 60, s["processes"][key]["rss_mb"]) for s in samples
                  if key in s["processes"]]
        slope = row["mb_per_10min"]
        label = f"{row['process'][:38]} ({row['pid']})" + (
            f": {slope:+.2f} MB/10 min" if slope is not None else "")
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
    ax.axvline(document["settings"]["settle"] / 60, color="grey", linestyle="--")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS, MB")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path, f"RSS per process during {document['title']}")


def plot(document: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    windows = document["windows"]
    t = [w["t_s"] / 60 for w in windows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for key, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
        top.plot(t, [w[key] for w in windows], style, label=key.replace("_ms", ""))
    top.set_ylabel("latency, ms")
    top.set_yscale("log")
    top.legend(loc="upper left")
    top.grid(True, alpha=0.3)
    interval = document["settings"]["interval"]
    bottom.plot(t, [w["ok"] / interval for w in windows], label="answered OK, req/s")
    bottom.plot(t, [w["failed"] / interval for w in windows], label="failed, req/s")
    bottom.axhline(document["target_rps"], color="grey", linestyle="--", label="target rate")
    bottom.set_ylabel("req/s")
    bottom.set_xlabel("minutes")
    bottom.legend(loc="lower left")
    bottom.grid(True, alpha=0.3)
    save_figure(fig, path, document["title"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds per window")
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="share of the measured maximum throughput to hold")
    parser.add_argument("--max-rps", type=float, help="skip the probe: the maximum is this")
    parser.add_argument("--probe-s", type=float, default=20.0)
    parser.add_argument("--probe-concurrency", type=int, default=32)
    parser.add_argument("--decide-share", type=float, default=0.5,
                        help="share of /v1/decide requests (the rest: /v2 infer)")
    parser.add_argument("--model", default="risk_mlp")
    parser.add_argument("--target", default="keel_haproxy", choices=[
        n for n, t in TARGETS.items() if t.kind == "keel"])
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--rss-every", type=float, default=60.0,
                        help="seconds between RSS samples of every Ray process")
    parser.add_argument("--settle", type=float, default=600.0,
                        help="seconds before the growth lines start (start-up, warm-up)")
    parser.add_argument("--growth-limit", type=float, default=1.0,
                        help="MB per 10 minutes above which a process counts as growing")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1 or not 0 <= args.decide_share <= 1:
        parser.error("--fraction must be in (0, 1] and --decide-share in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (REPO_ROOT / "models" / args.model).is_dir():
        log("no demo models: run `.venv/bin/keel prepare` (or `make prepare`) first")
        return 2
    install_fast_loop()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat()
    server_args = serving_core.parse_args(["--no-dashboard", "--out", str(args.out)])
    server = Server(TARGETS[args.target], server_args, args.out / f"{stamp}-soak-server.log")
    document: dict[str, Any] = {"started_at": dt.datetime.now().isoformat(timespec="seconds"),
                                "settings": {k: str(v) if isinstance(v, Path) else v
                                             for k, v in vars(args).items()},
                                "target": TARGETS[args.target].description,
                                "cpus": os.cpu_count()}
    json_path = args.out / f"{stamp}-soak.json"
    try:
        server.start()
        probe_body = make_bodies(pool=1, seed=1)[0]
        server.wait_ready(240, probe_body)
        base = f"http://127.0.0.1:{server.load_port}"
        mix = Mix(base, args.model, args.decide_share, args.seed)
        # Warm every path (first requests pay for handle set-up) before measuring.
        asyncio.run(probe(mix, 4, 5.0, args.request_timeout))
        if args.max_rps is None:
            log(f"probing the maximum: {args.probe_concurrency} clients, {args.probe_s:g} s")
            max_rps = asyncio.run(probe(mix, args.probe_concurrency, args.probe_s,
                                        args.request_timeout))
        else:
            max_rps = args.max_rps
        rate = max_rps * args.fraction
        document["max_rps"] = round(max_rps, 1)
        document["target_rps"] = round(rate, 1)
        log(f"maximum {max_rps:.0f} req/s; holding {rate:.0f} req/s for {args.duration:g} s")
        windows_total = math.ceil(args.duration / args.interval)
        with MemorySampler(server, args.rss_every) as sampler, \
                Progress("soak", windows_total, unit="windows") as progress:

            def on_window(window: Window) -> None:
                s = window.summary()
                log(f"t={s['t_s']:>6}s sent {s['sent']:>5} ok {s['ok']:>5} failed "
                    f"{s['failed']:>3} p50 {s['p50_ms']} p95 {s['p95_ms']} p99 {s['p99_ms']} ms")
                progress.advance(f"t={s['t_s']:g} s")

            progress.step(f"{rate:.0f} req/s")
            windows = asyncio.run(soak(mix, rate, args.duration, args.interval,
                                       args.request_timeout, on_window))
    finally:
        document["stop"] = server.stop()
        server.cleanup()
    summaries = [w.summary() for w in windows]
    latencies = [v for w in windows for v in w.latencies_ms]
    ok = sum(w.ok for w in windows)
    failed = sum(w.failed for w in windows)
    statuses: dict[str, int] = {}
    for w in windows:
        for k, v in w.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    memory = memory_table(sampler.samples[0]["processes"], sampler.samples[-1]["processes"])
    growth = growth_lines(sampler.samples, args.settle, args.growth_limit)
    document.update({
        "title": (f"Keel soak: {rate:.0f} req/s ({args.fraction:.0%} of the measured "
                  f"{max_rps:.0f}) for {args.duration / 60:g} min, {args.decide_share:.0%} "
                  f"/v1/decide, {os.cpu_count()} CPUs shared with the load generator"),
        "windows": summaries,
        "total": {"sent": sum(w.sent for w in windows), "ok": ok, "failed": failed,
                  "statuses": statuses,
                  "success": round(ok / (ok + failed), 6) if ok + failed else None,
                  **percentiles(latencies, digits=2)},
        "memory": memory,
        "memory_total_mb": {
            "start": round(sum(r["start_mb"] or 0 for r in memory), 1),
            "end": round(sum(r["end_mb"] or 0 for r in memory), 1)},
        "memory_samples": sampler.samples,
        "memory_growth": growth,
        "growing": [r for r in growth if r["growing"]],
    })
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    plot(document, json_path.with_suffix(".png"))
    plot_memory(document, json_path.with_name(json_path.stem + "-memory.png"))
    print(f"\n{document['title']}\n")
    print("| minutes | sent | ok | failed | success | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    per_minute = max(1, int(60 // args.interval))
    for i in range(0, len(windows), per_minute):
        group = windows[i:i + per_minute]
        merged = Window(start_s=group[0].start_s, sent=sum(w.sent for w in group),
                        ok=sum(w.ok for w in group), failed=sum(w.failed for w in group),
                        latencies_ms=[v for w in group for v in w.latencies_ms])
        s = merged.summary()
        print(f"| {s['t_s'] / 60:.0f}-{(s['t_s'] + len(group) * args.interval) / 60:.0f} "
              f"| {s['sent']} | {s['ok']} | {s['failed']} | {s['success']} | {s['p50_ms']} "
              f"| {s['p95_ms']} | {s['p99_ms']} |")
    t = document["total"]
    print(f"| all | {t['sent']} | {t['ok']} | {t['failed']} | {t['success']} | {t['p50_ms']} "
          f"| {t['p95_ms']} | {t['p99_ms']} |\n")
    print("| process | RSS start MB | RSS end MB | delta MB |")
    print("|---|---|---|---|")
    for row in memory:
        print(f"| {row['process']} | {row['start_mb']} | {row['end_mb']} | {row['delta_mb']} |")
    m = document["memory_total_mb"]
    print(f"| all {len(memory)} processes | {m['start']} | {m['end']} | "
          f"{round(m['end'] - m['start'], 1)} |")
    print(f"\nGrowth after the first {args.settle / 60:g} min (least squares, MB per 10 min; "
          f"limit {args.growth_limit:g}):\n")
    print("| process | pid | samples | first MB | last MB | settled min..max MB | MB/10 min |")
    print("|---|---|---|---|---|---|---|")
    for row in sorted(growth, key=lambda r: -(r["mb_per_10min"] or 0)):
        flag = " **growing**" if row["growing"] else ""
        print(f"| {row['process']} | {row['pid']} | {row['samples']} | {row['first_mb']} "
              f"| {row['last_mb']} | {row['settled_min_mb']}..{row['settled_max_mb']} "
              f"| {row['mb_per_10min']}{flag} |")
    log(f"wrote {json_path}, {json_path.with_suffix('.png')} and the -memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
