"""A sweep: every concurrency, one after another, against a ready server, with the
closed-loop HTTP load generator; Keel's batch sizes read between the points."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

from bench.harness.http_load import run_load
from bench.harness.progress import Progress, log
from bench.harness.report import fmt
from bench.harness.servers import Server, check_point
from bench.harness.statistics import batch_delta, mean_batch

#: Called before a point's load; what it returns is called with the point's figures after
#: the load (to add its own) and returns more text for the point's log line.
PointHook = Callable[[], Callable[[dict[str, Any]], str]]


def sweep(server: Server, run: dict[str, Any], args: argparse.Namespace, bodies: list[bytes],
          label: str, progress: Progress, on_point: PointHook | None = None) -> None:
    """``args.concurrency`` against ``server.infer_url()``; each point (``LoadResult``'s
    figures, ``batch_sizes``, ``mean_batch``, ``replicas``) goes into ``run["points"]``,
    the last stats snapshot into ``run["stats_end"]``."""
    before = server.stats()
    for concurrency in args.concurrency:
        progress.step(f"{label} c={concurrency}")
        finish = on_point() if on_point is not None else None
        result = asyncio.run(run_load(server.infer_url(), concurrency, args.duration,
                                      args.warmup, bodies, args.request_timeout))
        point = result.to_dict()
        extra = finish(point) if finish is not None else ""
        after = server.stats()
        point["batch_sizes"] = batch_delta(before, after, args.model)
        point["mean_batch"] = mean_batch(point["batch_sizes"])
        point["replicas"] = (after or {}).get("replicas")
        before = after
        run["points"].append(point)
        log(f"{label} c={concurrency}: {point['rps']:.0f} rps, p95 {fmt(point['p95_ms'])} ms, "
            f"errors {point['errors']}{extra}"
            + (f", mean batch {point['mean_batch']:.1f}" if point["mean_batch"] else ""))
        progress.advance(f"{label} c={concurrency}")
        check_point(server, point, label)
    run["stats_end"] = before
