"""Closed-loop HTTP load generator for Open Inference Protocol endpoints.

``concurrency`` workers each send one request, wait for the answer, and send
the next, for ``warmup_s + duration_s``. Only requests that *complete* inside
the measured window ``[start + warmup_s, start + warmup_s + duration_s]`` are
counted; requests still in flight when the window closes are drained but not
counted. Throughput is ``completed / duration_s``.

Request bodies come from a fixed pool of seeded random rows, so requests differ
(no cache or batch sees the same row twice in a row) and runs are repeatable.

Usable as a library (``run_load``) or from the command line::

    .venv/bin/python bench/loadgen.py http://127.0.0.1:8000/v2/models/risk_mlp/infer \
        --concurrency 8 --duration 10 --warmup 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import numpy as np

#: Error bodies kept per run, so a failing target can be diagnosed from the JSON.
MAX_ERROR_SAMPLES = 5


def make_bodies(input_name: str = "features", width: int = 12, pool: int = 512,
                seed: int = 20240611) -> list[bytes]:
    """``pool`` distinct OIP JSON bodies, each one FP32 row ``[1, width]``."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(pool):
        row = [round(rng.gauss(0.0, 1.0), 6) for _ in range(width)]
        document = {"inputs": [{"name": input_name, "shape": [1, width],
                                "datatype": "FP32", "data": row}]}
        bodies.append(json.dumps(document, separators=(",", ":")).encode())
    return bodies


@dataclass
class LoadResult:
    """Figures of one load run at one concurrency."""

    url: str
    concurrency: int
    duration_s: float
    warmup_s: float
    requests: int = 0
    ok: int = 0
    errors: int = 0
    error_rate: float = 0.0
    rps: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    max_ms: float | None = None
    #: Status code (or exception class name) -> count, measured window only.
    statuses: dict[str, int] = field(default_factory=dict)
    #: Up to MAX_ERROR_SAMPLES (status, first 500 characters of the body / exception).
    error_samples: list[list[str]] = field(default_factory=list)
    #: Requests sent during warm-up / drained after the window (not counted).
    warmup_requests: int = 0
    drained_requests: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _worker(session: aiohttp.ClientSession, url: str, bodies: list[bytes], offset: int,
                  stride: int, window: tuple[float, float], latencies: list[float],
                  statuses: Counter[str], samples: list[list[str]],
                  counts: Counter[str], timeout: aiohttp.ClientTimeout) -> None:
    start, end = window
    index = offset
    headers = {"Content-Type": "application/json"}
    while True:
        sent = time.perf_counter()
        if sent >= end:
            return
        body = bodies[index % len(bodies)]
        index += stride
        status: str
        detail = ""
        try:
            async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                payload = await resp.read()
                status = str(resp.status)
                if resp.status != 200:
                    detail = payload[:500].decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            status = type(exc).__name__
            detail = str(exc)[:500]
        done = time.perf_counter()
        if not status.isdigit():
            # A refused connection fails at once; without a pause the loop would spin.
            await asyncio.sleep(0.01)
        if done < start:
            counts["warmup"] += 1
            continue
        if done > end:
            counts["drained"] += 1
            continue
        statuses[status] += 1
        if status == "200":
            latencies.append(done - sent)
        elif len(samples) < MAX_ERROR_SAMPLES:
            samples.append([status, detail])


async def run_load(url: str, concurrency: int, duration_s: float, warmup_s: float = 2.0,
                   bodies: list[bytes] | None = None,
                   request_timeout_s: float = 30.0) -> LoadResult:
    """Run ``concurrency`` closed-loop workers against ``url`` and summarise the window."""
    if concurrency < 1 or duration_s <= 0 or warmup_s < 0:
        raise ValueError("concurrency >= 1, duration_s > 0 and warmup_s >= 0 are required")
    pool = bodies if bodies is not None else make_bodies()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    samples: list[list[str]] = []
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    # One keep-alive connection per worker, like N independent clients.
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency,
                                     force_close=False, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        begin = time.perf_counter()
        window = (begin + warmup_s, begin + warmup_s + duration_s)
        # Workers start at different points of the pool so concurrent requests differ.
        stride = max(1, concurrency)
        await asyncio.gather(*(
            _worker(session, url, pool, i, stride, window, latencies, statuses, samples,
                    counts, timeout)
            for i in range(concurrency)))
    result = LoadResult(url=url, concurrency=concurrency, duration_s=duration_s,
                        warmup_s=warmup_s)
    result.ok = len(latencies)
    result.requests = sum(statuses.values())
    result.errors = result.requests - result.ok
    result.error_rate = result.errors / result.requests if result.requests else 0.0
    result.rps = result.ok / duration_s
    result.statuses = dict(sorted(statuses.items()))
    result.error_samples = samples
    result.warmup_requests = counts["warmup"]
    result.drained_requests = counts["drained"]
    if latencies:
        ms = np.asarray(latencies) * 1000.0
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        result.p50_ms, result.p95_ms, result.p99_ms = float(p50), float(p95), float(p99)
        result.mean_ms, result.max_ms = float(ms.mean()), float(ms.max())
    return result


def install_fast_loop() -> None:
    """Use uvloop when it is installed: the client shares the CPUs with the server."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000/v2/models/risk_mlp/infer")
    parser.add_argument("--concurrency", "-c", type=int, nargs="+", default=[8],
                        help="closed-loop workers; several values run one after another")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--input-name", default="features")
    parser.add_argument("--width", type=int, default=12, help="features per row")
    parser.add_argument("--pool", type=int, default=512, help="distinct request bodies")
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")
    args = parser.parse_args(argv)
    install_fast_loop()
    bodies = make_bodies(args.input_name, args.width, args.pool, args.seed)
    results = []
    for concurrency in args.concurrency:
        result = asyncio.run(run_load(args.url, concurrency, args.duration, args.warmup,
                                      bodies, args.timeout))
        results.append(result.to_dict())
    json.dump(results if len(results) > 1 else results[0], sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
