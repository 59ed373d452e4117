"""Autoscaling of a model deployment under a load step, with the shipped knobs.

Starts a private local Ray instance (see ``harness.local_ray``) with Serve in the mode
``make demo`` runs (throughput-optimised, HAProxy), deploys Keel from
serve_config.yaml reduced to the Ingress, the SloMonitor and one model, and then:

1. ``idle``: one client (a trickle of requests, so there is always one in flight),
2. ``load``: ``--clients`` more closed-loop clients for ``--load-s`` seconds,
3. ``cool``: back to the one client until the model is at ``min_replicas`` again
   (or ``--cool-s`` passed),

polling the controller every half second for the model's running replicas and the
autoscaler's target. It writes the timeline and the reaction times as JSON and a
PNG, and prints a table.

The model's ``autoscaling_config`` is serve_config.yaml's unless ``--autoscaling``
overrides fields. Its replicas are made slow on purpose: ``--batch-wait-s`` (0.25 s)
with a ``max_batch_size`` of 64, above the number of clients, so that no batch ever
fills and every request spends that long in the replica whatever the replica count,
like a model bound by I/O or an accelerator's queue rather than by this machine's two
cores. That keeps requests *ongoing*, which is what Serve's autoscaler measures; it
also means more replicas add concurrency, not speed, here: the figures are the
control loop's reaction times and the errors while replicas come and go, not a
capacity gain. (With ``--clients 64`` one replica's batches do fill, and it answers
faster than four replicas whose batches never do: scaling out splits batches.)

    .venv/bin/python -m bench.autoscale                       # shipped knobs, ~4 min
    .venv/bin/python -m bench.autoscale --autoscaling '{"upscale_delay_s": 1}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from bench.harness.http_load import make_bodies
from bench.harness.local_serve import serve_environment, start_and_deploy
from bench.harness.network import quiet_port
from bench.harness.progress import Progress
from bench.harness.report import REPO_ROOT, RESULTS_DIR, pyplot, save_figure, text_table
from bench.harness.statistics import percentiles

RESULTS = RESULTS_DIR
STAMP = "2026-11-27"
# The demo model in its own (autoscaled) deployment; the MLPs run in the ingress.
MODEL = "risk_gbdt"
WIDTH = 12


def model_repository(temp_dir: Path) -> Path:
    """models/ when ``keel prepare`` built it, else the demo built into ``temp_dir``."""
    shipped = REPO_ROOT / "models"
    if (shipped / MODEL).is_dir():
        return shipped
    from graph.demo.build import build_demo_repository

    target = temp_dir / "models"
    build_demo_repository(target)
    return target


def app_config(repo: Path, port: int, args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    app = config["applications"][0]
    app["args"].update(model_repository=str(repo), models=[MODEL], feature_repo=None,
                       llm=False)
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("Ingress", "SloMonitor", MODEL)]
    for dep in app["deployments"]:
        if dep["name"] == "Ingress":
            # Every request reaches the model: the load is what the autoscaler sees.
            dep["user_config"]["cache"]["enabled"] = False
        if dep["name"] == MODEL:
            dep["autoscaling_config"].update(json.loads(args.autoscaling))
            dep["user_config"].update(max_batch_size=64, batch_wait_timeout_s=args.batch_wait_s)
    return config


class Timeline:
    """Answers per second and replica samples, on one clock."""

    def __init__(self) -> None:
        self.clock = time.monotonic()
        self.answers: list[tuple[float, str, float]] = []  # (t, status, latency_s)
        self.samples: list[dict[str, Any]] = []
        self.marks: dict[str, float] = {}

    def now(self) -> float:
        return time.monotonic() - self.clock

    def mark(self, name: str) -> None:
        self.marks[name] = round(self.now(), 2)

    def rows(self) -> list[dict[str, Any]]:
        end = int(self.now()) + 1
        rows = []
        for second in range(end):
            answers = [a for a in self.answers if second <= a[0] < second + 1]
            ok = [a[2] for a in answers if a[1] == "200"]
            sample: dict[str, Any] = next(
                (s for s in reversed(self.samples) if s["t"] < second + 1), {})
            rows.append({"t": second, "replicas": sample.get("replicas"),
                         "target": sample.get("target"), "ok": len(ok),
                         "failed": len(answers) - len(ok),
                         **percentiles([v * 1000 for v in ok], (50,), digits=1)})
        return rows


async def client(session: Any, url: str, bodies: list[bytes], offset: int,
                 stop: asyncio.Event, timeline: Timeline) -> None:
    import aiohttp

    i = offset
    while not stop.is_set():
        sent = time.monotonic()
        try:
            async with session.post(url, data=bodies[i % len(bodies)],
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                status = str(resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            status = type(exc).__name__
            await asyncio.sleep(0.01)
        timeline.answers.append((timeline.now(), status, time.monotonic() - sent))
        i += 101


def poll_replicas(serve_client: Any, app: str, timeline: Timeline,
                  stop: threading.Event) -> None:
    """Sample the model's running replicas and target every half second (a thread:
    the controller call blocks)."""
    while not stop.is_set():
        try:
            details = serve_client.get_serve_details()["applications"][app]["deployments"]
            dep = details[MODEL]
            timeline.samples.append({
                "t": round(timeline.now(), 2),
                "replicas": sum(r["state"] == "RUNNING" for r in dep["replicas"]),
                "target": dep["target_num_replicas"]})
        except Exception as exc:  # a slow controller answer must not end the run
            print(f"poll failed: {exc!r}", flush=True)
        stop.wait(0.5)


async def drive(url: str, args: argparse.Namespace, timeline: Timeline,
                min_replicas: int, progress: Progress) -> None:
    import aiohttp

    bodies = make_bodies(width=WIDTH, pool=512, seed=7)
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=args.clients + 1)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        trickle_stop, load_stop = asyncio.Event(), asyncio.Event()
        trickle = [asyncio.create_task(client(session, url, bodies, 0, trickle_stop, timeline))]
        timeline.mark("idle")
        progress.step(f"idle, {args.idle_s:g} s")
        await asyncio.sleep(args.idle_s)
        progress.advance("idle")
        timeline.mark("load")
        progress.step(f"load, {args.clients} clients for {args.load_s:g} s")
        load = [asyncio.create_task(client(session, url, bodies, k + 1, load_stop, timeline))
                for k in range(args.clients)]
        await asyncio.sleep(args.load_s)
        load_stop.set()
        await asyncio.gather(*load)
        progress.advance("load")
        timeline.mark("cool")
        progress.step(f"cool, until min_replicas (at most {args.cool_s:g} s)")
        deadline = time.monotonic() + args.cool_s
        while time.monotonic() < deadline:
            recent = [s for s in timeline.samples if s["t"] > timeline.marks["cool"] + 1]
            if recent and recent[-1]["replicas"] == min_replicas \
                    and recent[-1]["target"] == min_replicas:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # a few seconds at min_replicas, still serving
        trickle_stop.set()
        await asyncio.gather(*trickle)
        progress.advance("cool")
        timeline.mark("end")


def reactions(timeline: Timeline, max_replicas: int, min_replicas: int) -> dict[str, Any]:
    """Seconds from the load step to each autoscaler milestone (None: never)."""
    load, cool = timeline.marks["load"], timeline.marks["cool"]

    def first(after: float, test: Any) -> float | None:
        hit = next((s["t"] for s in timeline.samples if s["t"] >= after and test(s)), None)
        return None if hit is None else round(hit - after, 1)

    return {
        "target_above_min_s": first(load, lambda s: s["target"] > min_replicas),
        "replicas_above_min_s": first(load, lambda s: s["replicas"] > min_replicas),
        "replicas_at_max_s": first(load, lambda s: s["replicas"] >= max_replicas),
        "peak_replicas": max((s["replicas"] for s in timeline.samples
                              if load <= s["t"] <= cool + 1), default=None),
        "target_back_to_min_s": first(cool, lambda s: s["target"] == min_replicas),
        "replicas_back_to_min_s": first(cool, lambda s: s["replicas"] == min_replicas
                                        and s["target"] == min_replicas),
    }


def phase_summary(timeline: Timeline) -> list[dict[str, Any]]:
    bounds = [("idle", "load"), ("load", "cool"), ("cool", "end")]
    rows = []
    for start, end in bounds:
        t0, t1 = timeline.marks[start], timeline.marks[end]
        answers = [a for a in timeline.answers if t0 <= a[0] < t1]
        ok = [a[2] * 1000 for a in answers if a[1] == "200"]
        samples = [s for s in timeline.samples if t0 <= s["t"] < t1]
        rows.append({"phase": start, "seconds": round(t1 - t0, 1),
                     "requests": len(answers), "failed": len(answers) - len(ok),
                     "rps": round(len(ok) / (t1 - t0), 1) if t1 > t0 else None,
                     **percentiles(ok, (50, 95), digits=1),
                     "replicas_min": min((s["replicas"] for s in samples), default=None),
                     "replicas_max": max((s["replicas"] for s in samples), default=None),
                     "statuses": dict(Counter(a[1] for a in answers))})
    return rows


def plot(rows: list[dict[str, Any]], marks: dict[str, float], knobs: dict[str, Any],
         path: Path) -> None:
    plt = pyplot()
    t = [r["t"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.step(t, [r["replicas"] or 0 for r in rows], where="post", label="running replicas",
            color="tab:blue", linewidth=2)
    ax.step(t, [r["target"] or 0 for r in rows], where="post", label="autoscaler target",
            color="tab:blue", linestyle="--", alpha=0.6)
    ax.set_ylabel("replicas")
    ax.set_ylim(0, knobs["max_replicas"] + 1)
    ax.set_xlabel("seconds")
    ax.axvspan(marks["load"], marks["cool"], color="tab:orange", alpha=0.12,
               label="load step")
    rate = ax.twinx()
    rate.plot(t, [r["ok"] for r in rows], color="tab:green", label="answers/s (200)")
    failed = [r["failed"] for r in rows]
    if any(failed):
        rate.plot(t, failed, color="tab:red", label="failed/s")
    rate.set_ylabel("requests per second")
    rate.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = rate.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    ax.set_title(f"{MODEL}: autoscaling under a load step (min {knobs['min_replicas']}, "
                 f"max {knobs['max_replicas']}, target {knobs['target_ongoing_requests']} "
                 f"ongoing, up {knobs['upscale_delay_s']} s, down "
                 f"{knobs['downscale_delay_s']} s)", fontsize=9)
    ax.grid(True, alpha=0.3)
    save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, default=56,
                        help="closed-loop clients in the step (keep below 64: see above)")
    parser.add_argument("--idle-s", type=float, default=10)
    parser.add_argument("--load-s", type=float, default=75)
    parser.add_argument("--cool-s", type=float, default=150,
                        help="longest wait for min_replicas after the step")
    parser.add_argument("--batch-wait-s", type=float, default=0.25,
                        help="the model's batch_wait_timeout_s (its slowness)")
    parser.add_argument("--autoscaling", default="{}",
                        help="JSON merged into the model's autoscaling_config")
    parser.add_argument("--out", type=Path, default=RESULTS / f"{STAMP}-autoscale.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temp_dir = Path(tempfile.mkdtemp(prefix="kas", dir="/tmp"))
    port = quiet_port()
    serve_environment(temp_dir)
    from bench.harness.local_ray import shutdown

    repo = model_repository(temp_dir)
    config = app_config(repo, port, args)
    app = config["applications"][0]
    knobs = next(d for d in app["deployments"] if d["name"] == MODEL)["autoscaling_config"]
    started = time.monotonic()
    timeline = Timeline()
    stop_polling = threading.Event()
    try:
        serve_client = start_and_deploy(temp_dir, config, port)
        print(f"deployed in {time.monotonic() - started:.0f} s; knobs {knobs}", flush=True)
        timeline = Timeline()
        poller = threading.Thread(target=poll_replicas,
                                  args=(serve_client, app["name"], timeline, stop_polling),
                                  daemon=True)
        poller.start()
        url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
        with Progress("autoscale", 3, unit="phases") as progress:
            asyncio.run(drive(url, args, timeline, knobs["min_replicas"], progress))
    finally:
        stop_polling.set()
        shutdown()

    rows = timeline.rows()
    phases = phase_summary(timeline)
    reaction = reactions(timeline, knobs["max_replicas"], knobs["min_replicas"])
    document = {
        "what": "risk_mlp replicas and answers per second under a load step; "
                "autoscaling_config from serve_config.yaml unless overridden",
        "model": MODEL, "autoscaling_config": knobs, "clients": args.clients,
        "batch_wait_timeout_s": args.batch_wait_s, "max_batch_size": 64,
        "mode": "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1",
        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
        "marks_s": timeline.marks, "reactions_s": reaction, "phases": phases,
        "timeline": rows, "samples": timeline.samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    png = args.out.with_suffix(".png")
    plot(rows, timeline.marks, knobs, png)
    print(text_table(phases, ["phase", "seconds", "requests", "failed", "rps", "p50_ms",
                              "p95_ms", "replicas_min", "replicas_max"]))
    print("\nreaction times (s after the step started / ended):")
    print(text_table([reaction], list(reaction)))
    print(f"\nwrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
