"""A multiplexed fleet: cold-load and hit latency, and bursts over more models than the
fleet holds.

Deploys configs/serve/canary.yaml's fleet as shipped (``TenantFleet``: two replicas, at
most 10 of the 50 demo tenants per replica, the Ingress and SloMonitor of
serve_config.yaml with metrics and tracing as shipped) on a private local Ray instance in
the mode ``make demo`` runs, and measures, ``--repeat`` times (medians reported):

1. ``cold``: ``--cold`` tenants that no replica holds, one request at a time: the
   latency of a request that loads its model (and the replica's own load time);
2. ``hit``: ``--hot`` tenants, each held by a replica, one request at a time: the
   latency of a request to a loaded member;
3. ``hot_load``: ``--clients`` closed-loop clients over those hot tenants: throughput
   and latency when every member is held;
4. ``burst_uniform``: ``--clients`` clients over all 50 tenants, uniformly, for
   ``--burst-s``: twice as many models as the fleet holds (20), so members are unloaded
   and loaded again all the time; every failed request is counted;
5. ``burst_zipf``: the same with a Zipf (s = 1.1) choice of tenant: a realistic mix
   where a few tenants are busy and most are not.

Every request carries a row of its own, never sent before (``--seed`` defaults to the
clock: the prediction cache, on as shipped, keeps answers for 10 minutes, so rows
repeated from an earlier run would be hits), and every answer is checked:
its ``model_name`` must be the tenant asked for. What the replicas loaded and unloaded
comes from their own ledgers (``FleetModel.stats()``).

    .venv/bin/python -m bench.fleet               # ~4 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.harness.local_serve import serve_environment, start_and_deploy
from bench.harness.network import quiet_port
from bench.harness.progress import Progress
from bench.harness.report import REPO_ROOT, RESULTS_DIR, pyplot, save_figure, text_table
from bench.harness.statistics import percentiles

STAMP = "2026-12-06"
APP = "keel"
FLEET = "TenantFleet"
WIDTH = 12


def app_config(repo: Path, port: int) -> dict[str, Any]:
    """canary.yaml's fleet with serve_config.yaml's Ingress and SloMonitor, as shipped."""
    config: dict[str, Any] = yaml.safe_load(
        (REPO_ROOT / "configs" / "serve" / "canary.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    config.pop("grpc_options", None)
    app = config["applications"][0]
    app["args"].update(model_repository=str(repo), models=["risk_mlp"], feature_repo=None,
                       llm=False, placement={"risk_mlp": "ingress"})
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("Ingress", "SloMonitor", FLEET)]
    for dep in app["deployments"]:
        if dep["name"] == "Ingress":
            dep["user_config"]["models"] = {"risk_mlp": {"version": "1"}}
    return config


def tenants() -> list[str]:
    from graph.demo.build import FLEET_SIZE, tenant_name

    return [tenant_name(i) for i in range(FLEET_SIZE)]


def body(rng: random.Random) -> bytes:
    row = [round(rng.gauss(0.0, 1.0), 6) for _ in range(WIDTH)]
    return json.dumps({"inputs": [{"name": "features", "shape": [1, WIDTH],
                                   "datatype": "FP32", "data": row}]}).encode()


class Outcomes:
    """Every request's (tenant, status, latency ms) in one phase."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []

    def summary(self, seconds: float | None = None) -> dict[str, Any]:
        ok = [ms for _, status, ms in self.rows if status == "200"]
        failed = Counter(status for _, status, _ in self.rows if status != "200")
        result: dict[str, Any] = {"requests": len(self.rows), "failed": sum(failed.values()),
                                  "failures": dict(failed),
                                  **percentiles(ok, (50, 95, 99), digits=2)}
        if seconds:
            result["rps"] = round(len(ok) / seconds, 1)
        return result


async def one(session: Any, base: str, tenant: str, rng: random.Random,
              outcomes: Outcomes) -> None:
    import aiohttp

    sent = time.perf_counter()
    try:
        async with session.post(f"{base}/v2/models/{tenant}/infer", data=body(rng),
                                headers={"Content-Type": "application/json"}) as resp:
            payload = await resp.read()
            status = str(resp.status)
            if status == "200" and json.loads(payload)["model_name"] != tenant:
                status = "wrong_model"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        status = type(exc).__name__
    outcomes.rows.append((tenant, status, (time.perf_counter() - sent) * 1000))


async def sequential(session: Any, base: str, names: list[str], rng: random.Random,
                     gap_s: float = 0.0) -> Outcomes:
    outcomes = Outcomes()
    for name in names:
        await one(session, base, name, rng, outcomes)
        if gap_s:
            await asyncio.sleep(gap_s)
    return outcomes


async def closed_loop(session: Any, base: str, pick: Any, clients: int, seconds: float,
                      seed: str) -> tuple[Outcomes, float]:
    outcomes = Outcomes()
    deadline = time.monotonic() + seconds

    async def client(k: int) -> None:
        rng = random.Random(f"{seed}/{k}")
        while time.monotonic() < deadline:
            await one(session, base, pick(rng), rng, outcomes)

    started = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return outcomes, time.monotonic() - started


def zipf_picker(names: list[str], s: float = 1.1) -> Any:
    weights = np.array([1.0 / (rank + 1) ** s for rank in range(len(names))])
    cumulative = list(np.cumsum(weights / weights.sum()))
    order = names[:]
    random.Random(11).shuffle(order)  # which tenants are busy: not the first by name

    def pick(rng: random.Random) -> str:
        x = rng.random()
        for name, edge in zip(order, cumulative, strict=True):
            if x <= edge:
                return name
        return order[-1]

    return pick


async def ledgers() -> dict[str, dict[str, Any]]:
    """Each fleet replica's ledger, by replica id."""
    from ray import serve

    handle = serve.get_deployment_handle(FLEET, app_name=APP)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(80):
        stats = await handle.stats.remote()
        seen[stats["replica"]] = stats
        if len(seen) == 2:
            break
    return seen


def fleet_counts(before: dict[str, dict[str, Any]],
                 after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def total(state: dict[str, dict[str, Any]], field: str) -> int:
        return sum(sum(ledger[field].values()) for ledger in state.values())

    new_load_ms: list[float] = []  # each replica's latest load times (it keeps 1,000)
    for replica, ledger in after.items():
        new = sum(ledger["loads"].values()) - sum(
            before.get(replica, {}).get("loads", {}).values())
        new_load_ms += ledger["load_ms"][-new:] if new > 0 else []
    return {"loads": total(after, "loads") - total(before, "loads"),
            "unloads": total(after, "unloads") - total(before, "unloads"),
            "failed_loads": total(after, "failed_loads") - total(before, "failed_loads"),
            "held": {r: len(ledger["loaded"]) for r, ledger in after.items()},
            **percentiles(new_load_ms, (50, 95), digits=2, suffix="_load_ms")}


async def held_now() -> set[str]:
    return {name for ledger in (await ledgers()).values() for name in ledger["loaded"]}


async def run_once(base: str, args: argparse.Namespace, seed: int,
                   progress: Progress) -> dict[str, Any]:
    import aiohttp

    names = tenants()
    rng = random.Random(seed)
    results: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=args.clients + 1)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # 1. cold: tenants no replica holds, one at a time.
        held = await held_now()
        cold = [n for n in rng.sample(names, len(names)) if n not in held][:args.cold]
        before = await ledgers()
        outcomes = await sequential(session, base, cold, rng, gap_s=0.2)
        results["cold"] = {**outcomes.summary(), **fleet_counts(before, await ledgers())}
        progress.advance("cold")
        # 2. hit: tenants held by a replica, one at a time (the cold ones, now loaded).
        hot = cold[:args.hot]
        await asyncio.sleep(1)  # the replicas' model lists reach the routers
        before = await ledgers()
        outcomes = await sequential(session, base, hot * args.hit_rounds, rng)
        results["hit"] = {**outcomes.summary(), **fleet_counts(before, await ledgers())}
        progress.advance("hit")
        # 3. hot_load: closed-loop clients over the held tenants.
        before = await ledgers()
        outcomes, seconds = await closed_loop(session, base, lambda r: r.choice(hot),
                                              args.clients, args.hot_s, f"{seed}/hot")
        results["hot_load"] = {**outcomes.summary(seconds), **fleet_counts(before, await ledgers())}
        progress.advance("hot_load")
        # 4-5. bursts over every tenant.
        for phase, pick in (("burst_uniform", lambda r: r.choice(names)),
                            ("burst_zipf", zipf_picker(names))):
            before = await ledgers()
            outcomes, seconds = await closed_loop(session, base, pick, args.clients,
                                                  args.burst_s, f"{seed}/{phase}")
            results[phase] = {**outcomes.summary(seconds), **fleet_counts(before, await ledgers())}
            progress.advance(phase)
    return results


PHASES = ["cold", "hit", "hot_load", "burst_uniform", "burst_zipf"]
FIELDS = ["requests", "failed", "rps", "p50_ms", "p95_ms", "p99_ms", "loads", "unloads",
          "p50_load_ms", "p95_load_ms"]


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for phase in PHASES:
        row: dict[str, Any] = {"phase": phase}
        for field in FIELDS:
            values = [run[phase].get(field) for run in runs]
            values = [v for v in values if v is not None]
            row[field] = round(float(np.median(values)), 2) if values else None
        row["failed_total"] = sum(run[phase]["failed"] for run in runs)
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(rows))
    for offset, key, color in ((-0.2, "p50_ms", "tab:blue"), (0.2, "p95_ms", "tab:orange")):
        ax.bar(x + offset, [r[key] or 0 for r in rows], width=0.4, label=key.replace("_", " "),
               color=color)
    ax.set_xticks(x, [r["phase"] for r in rows])
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['loads']:g} loads\n{r['failed_total']} failed", (i, r["p95_ms"] or 1),
                    textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path, title)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", type=int, default=10, help="cold tenants per run")
    parser.add_argument("--hot", type=int, default=8, help="held tenants of the hit phases")
    parser.add_argument("--hit-rounds", type=int, default=10,
                        help="sequential requests per hot tenant")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--hot-s", type=float, default=10)
    parser.add_argument("--burst-s", type=float, default=20)
    parser.add_argument("--seed", type=int, default=int(time.time()),
                        help="of the rows sent (default: the clock, so no row repeats)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{STAMP}-fleet.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repo = REPO_ROOT / "models"
    if not (repo / "tenants").is_dir():
        print("run `keel prepare` first: models/tenants holds the demo fleet", file=sys.stderr)
        return 2
    temp_dir = Path(tempfile.mkdtemp(prefix="kfl", dir="/tmp"))
    port = quiet_port()
    serve_environment(temp_dir)
    from bench.harness.local_ray import shutdown

    config = app_config(repo, port)
    fleet = next(d for d in config["applications"][0]["deployments"] if d["name"] == FLEET)
    fleet_args = config["applications"][0]["args"]["fleets"][FLEET]
    runs: list[dict[str, Any]] = []
    try:
        start_and_deploy(temp_dir, config, port)
        base = f"http://127.0.0.1:{port}"
        with Progress("fleet", args.repeat * len(PHASES), unit="phases") as progress:

            async def every_run() -> None:  # one event loop: Serve's handles live on it
                for r in range(args.repeat):
                    runs.append(await run_once(base, args, args.seed * 10 + r, progress))

            asyncio.run(every_run())
    finally:
        shutdown()
    rows = medians(runs)
    document = {
        "what": "a multiplexed fleet (configs/serve/canary.yaml's TenantFleet, 50 tenants): "
                f"cold and hit latency, bursts; medians of {args.repeat} runs",
        "fleet": {"replicas": fleet.get("num_replicas"), **fleet_args},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "mode": "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1",
        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
        "medians": rows, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    png = args.out.with_suffix(".png")
    plot(rows, png, f"TenantFleet: 50 tenants, {fleet_args['max_models_per_replica']} per "
                    f"replica x {fleet.get('num_replicas')} replicas (median of {args.repeat})")
    print(text_table(rows, ["phase", *FIELDS, "failed_total"]))
    print(f"\nwrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
