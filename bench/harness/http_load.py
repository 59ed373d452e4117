"""Closed-loop HTTP load generator for Open Inference Protocol endpoints.

``concurrency`` workers each send one request, wait for the answer, and send
the next, for ``warmup_s + duration_s``. Only requests that *complete* inside
the measured window ``[start + warmup_s, start + warmup_s + duration_s]`` are
counted; requests still in flight when the window closes are drained but not
counted. Throughput is ``completed / duration_s``.

Request bodies come from a fixed pool of seeded random rows, so requests differ
(no cache or batch sees the same row twice in a row) and runs are repeatable.
``make_row_bodies`` builds bodies of N distinct rows each, ``make_zipf_bodies``
a sequence whose rows repeat by a Zipf law over a small pool (so a cache can hit);
with ``shared_sequence=True`` the workers take the bodies in order from one
sequence, so every server sees the same rows in the same order.

Usable as a library (``run_load``) or from the command line::

    .venv/bin/python -m bench.harness.http_load \
        http://127.0.0.1:8000/v2/models/risk_mlp/infer --concurrency 8 --duration 10 --warmup 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

import aiohttp
import numpy as np

from bench.harness.statistics import latency_figures

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


def _oip_body(input_name: str, rows: int, width: int, values: list[float]) -> bytes:
    """One OIP JSON body: FP32 ``[rows, width]``, ``data`` flat in row-major order."""
    head = (f'{{"inputs":[{{"name":"{input_name}","shape":[{rows},{width}],'
            f'"datatype":"FP32","data":[')
    return (head + ",".join(map(repr, values)) + "]}]}").encode()


def make_row_bodies(count: int, rows: int = 1, *, input_name: str = "features",
                    width: int = 12, seed: int = 20240611) -> list[bytes]:
    """``count`` OIP bodies of ``rows`` rows ``[rows, width]`` each, every row drawn anew
    (seeded standard normal values, 6 decimals): no row repeats, within a body or across
    bodies, so a prediction cache never hits (numpy: fast enough for millions of rows)."""
    if count < 1 or rows < 1:
        raise ValueError("count and rows must be >= 1")
    generator = np.random.default_rng(seed)
    values = np.round(generator.standard_normal((count, rows * width)), 6)
    return [_oip_body(input_name, rows, width, body) for body in values.tolist()]


def zipf_indices(generator: np.random.Generator, n: int, size: int, s: float) -> np.ndarray:
    """``size`` draws of an index in ``0..n-1`` with P(k) proportional to (k+1)^-s."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -s
    return generator.choice(n, size=size, p=weights / weights.sum())


def make_zipf_bodies(count: int, pool: int = 2000, s: float = 1.1, rows: int = 1, *,
                     input_name: str = "features", width: int = 12,
                     seed: int = 20240611) -> tuple[list[bytes], int]:
    """``count`` bodies of ``rows`` rows each, every row drawn from a pool of ``pool``
    distinct seeded rows by a truncated Zipf law (row k with P proportional to
    (k+1)^-s): a repeating mix where a prediction cache can hit. Returns the bodies and
    the number of distinct rows they contain."""
    if count < 1 or rows < 1 or pool < 1:
        raise ValueError("count, rows and pool must be >= 1")
    generator = np.random.default_rng(seed)
    table = np.round(generator.standard_normal((pool, width)), 6).tolist()
    picks = zipf_indices(generator, pool, count * rows, s).reshape(count, rows)
    bodies = [_oip_body(input_name, rows, width,
                        [value for k in body for value in table[k]])
              for body in picks.tolist()]
    return bodies, int(np.unique(picks).size)


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
    #: Bodies sent in all (warm-up and drained included) out of the pool's size: with a
    #: shared sequence, ``bodies_sent > bodies_available`` means the pool wrapped.
    bodies_sent: int = 0
    bodies_available: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


T = TypeVar("T")


class BodySequence(Generic[T]):
    """Where the workers take their next body: strided (worker i sends bodies i, i+c, ...,
    so concurrent requests differ) or from one shared sequence in order. (The gRPC load
    generator, ``grpc_load``, takes its prepared requests the same way.)"""

    def __init__(self, bodies: Sequence[T], stride: int, shared: bool) -> None:
        self.bodies = bodies
        self.stride = stride
        self.shared = shared
        self.sent = 0
        self._next = [0] if shared else list(range(stride))

    def take(self, worker: int) -> T:
        slot = 0 if self.shared else worker
        index = self._next[slot]
        self._next[slot] += 1 if self.shared else self.stride
        self.sent += 1
        return self.bodies[index % len(self.bodies)]


@dataclass
class Tally:
    """What the closed-loop workers of one point record (the HTTP and gRPC generators):
    a request counts when it completes inside the window ``[start, end]``."""

    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    samples: list[list[str]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def record(self, sent: float, done: float, status: str, ok: bool, detail: str) -> None:
        if done < self.start:
            self.counts["warmup"] += 1
        elif done > self.end:
            self.counts["drained"] += 1
        else:
            self.statuses[status] += 1
            if ok:
                self.latencies.append(done - sent)
            elif len(self.samples) < MAX_ERROR_SAMPLES:
                self.samples.append([status, detail])


async def _worker(session: aiohttp.ClientSession, url: str, bodies: BodySequence[bytes],
                  worker: int, tally: Tally, timeout: aiohttp.ClientTimeout) -> None:
    end = tally.end
    headers = {"Content-Type": "application/json"}
    while True:
        sent = time.perf_counter()
        if sent >= end:
            return
        body = bodies.take(worker)
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
        tally.record(sent, done, status, status == "200", detail)


async def run_load(url: str, concurrency: int, duration_s: float, warmup_s: float = 2.0,
                   bodies: list[bytes] | None = None,
                   request_timeout_s: float = 30.0, *,
                   shared_sequence: bool = False) -> LoadResult:
    """Run ``concurrency`` closed-loop workers against ``url`` and summarise the window.

    ``shared_sequence``: the workers take the bodies in order from one sequence (each
    body once until the pool wraps) instead of each worker its own stride of the pool.
    """
    if concurrency < 1 or duration_s <= 0 or warmup_s < 0:
        raise ValueError("concurrency >= 1, duration_s > 0 and warmup_s >= 0 are required")
    pool = bodies if bodies is not None else make_bodies()
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    # One keep-alive connection per worker, like N independent clients.
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency,
                                     force_close=False, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        begin = time.perf_counter()
        tally = Tally(begin + warmup_s, begin + warmup_s + duration_s)
        # Workers start at different points of the pool so concurrent requests differ.
        sequence = BodySequence(pool, max(1, concurrency), shared_sequence)
        await asyncio.gather(*(_worker(session, url, sequence, i, tally, timeout)
                               for i in range(concurrency)))
    return summarise_window(LoadResult(url=url, concurrency=concurrency,
                                       duration_s=duration_s, warmup_s=warmup_s),
                            tally, sequence)


def summarise_window(result: LoadResult, tally: Tally,
                     sequence: BodySequence[Any]) -> LoadResult:
    """Fill ``result`` with what the workers recorded in ``tally`` (latencies of the
    requests that succeeded in the window, statuses of all of them, error samples, the
    warm-up and drained counts) and how far ``sequence`` went."""
    latencies, statuses, counts = tally.latencies, tally.statuses, tally.counts
    duration_s = result.duration_s
    result.ok = len(latencies)
    result.requests = sum(statuses.values())
    result.errors = result.requests - result.ok
    result.error_rate = result.errors / result.requests if result.requests else 0.0
    result.rps = result.ok / duration_s
    result.statuses = dict(sorted(statuses.items()))
    result.error_samples = tally.samples
    result.warmup_requests = counts["warmup"]
    result.drained_requests = counts["drained"]
    result.bodies_sent = sequence.sent
    result.bodies_available = len(sequence.bodies)
    for key, value in latency_figures(latencies).items():
        setattr(result, key, value)
    return result


def install_fast_loop() -> None:
    """Use uvloop when it is installed: the client shares the CPUs with the server."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def print_results(results: list[dict[str, Any]]) -> None:
    """The command lines' output: one result (a JSON object) or several (a list)."""
    json.dump(results if len(results) > 1 else results[0], sys.stdout, indent=2)
    sys.stdout.write("\n")


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
    print_results([asyncio.run(run_load(args.url, concurrency, args.duration, args.warmup,
                                        bodies, args.timeout)).to_dict()
                   for concurrency in args.concurrency])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
