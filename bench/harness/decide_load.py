"""Workloads and a closed-loop load generator for ``POST /v1/decide``.

Three workloads over the demo entities (symbols ``SYM000``.., accounts ``ACC0000``..,
as ``graph.demo.dataset.DatasetConfig`` makes them; 50 x 200 = 10,000 pairs):

- ``hit``: a small seeded pool of (symbol, account) pairs, cycled; the caller
  warms the cache with the pool first, so nearly every row is a cache hit;
- ``miss``: a seeded permutation of all pairs, each pair once; with the cache
  emptied first, every row is a miss until the permutation wraps (a point that
  sends more rows than there are pairs sees hits after that; the measured hit
  ratio shows it);
- ``zipf``: symbol rank and account rank drawn independently from a truncated
  Zipf law (P(k) proportional to k^-s, k = 1..N, seeded); rank k is the k-th
  entity id, so ``SYM000``/``ACC0000`` are the hottest.

Every request body is built before the point starts; workers take the next body
from one shared sequence (``http_load.BodySequence``), so the servers
see the same sequence of entities whatever the concurrency. The generator parses
each 200 answer (``results[].cache`` and ``timings_ms``), which is what the hit
ratio and the server-side time breakdown are measured from.

    .venv/bin/python -m bench.harness.decide_load http://127.0.0.1:8300/v1/decide \
        --workload zipf -c 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from bench.harness.http_load import (
    BodySequence,
    LoadResult,
    Tally,
    install_fast_loop,
    print_results,
    summarise_window,
    zipf_indices,
)
from bench.harness.statistics import percentiles

WORKLOADS = ("hit", "miss", "zipf")
STAGES = ("features", "cache", "model", "total")


def entity_ids(n_symbols: int = 50, n_accounts: int = 200) -> tuple[list[str], list[str]]:
    """The demo's entity ids (graph/demo/dataset.py)."""
    return ([f"SYM{i:03d}" for i in range(n_symbols)],
            [f"ACC{i:04d}" for i in range(n_accounts)])


@dataclass
class Workload:
    """The request bodies of one point, in the order they are sent."""

    name: str
    batch: int
    bodies: list[bytes]
    #: The distinct entity pairs the hit workload cycles through (the caller warms them).
    pool: list[tuple[str, str]] = field(default_factory=list)
    #: How many distinct pairs the whole body sequence names.
    distinct_pairs: int = 0


def make_workload(name: str, *, model: str = "risk_mlp", batch: int = 1, seed: int = 20240611,
                  n_symbols: int = 50, n_accounts: int = 200, hit_pool: int = 64,
                  zipf_s: float = 1.1, zipf_rows: int = 120_000) -> Workload:
    """The bodies of one workload (see the module docstring)."""
    symbols, accounts = entity_ids(n_symbols, n_accounts)
    if name == "hit":
        rng = random.Random(seed)
        pool = rng.sample([(s, a) for s in symbols for a in accounts], hit_pool)
        # Enough bodies that every offset into the pool appears, whatever the batch size.
        pairs = [pool[i % hit_pool] for i in range(hit_pool * batch)]
    elif name == "miss":
        rng = random.Random(seed)
        pool = []
        pairs = [(s, a) for s in symbols for a in accounts]
        rng.shuffle(pairs)
        pairs = pairs[:len(pairs) - len(pairs) % batch]
    elif name == "zipf":
        generator = np.random.default_rng(seed)
        pool = []
        rows = zipf_rows - zipf_rows % batch
        sym = zipf_indices(generator, n_symbols, rows, zipf_s)
        acc = zipf_indices(generator, n_accounts, rows, zipf_s)
        pairs = [(symbols[i], accounts[j]) for i, j in zip(sym, acc, strict=True)]
    else:
        raise ValueError(f"unknown workload {name!r} (known: {WORKLOADS})")
    bodies = []
    for start in range(0, len(pairs), batch):
        entities = [{"symbol": s, "account_id": a} for s, a in pairs[start:start + batch]]
        bodies.append(json.dumps({"model": model, "entities": entities},
                                 separators=(",", ":")).encode())
    return Workload(name=name, batch=batch, bodies=bodies, pool=pool,
                    distinct_pairs=len(set(pairs)))


@dataclass
class DecideResult(LoadResult):
    """Figures of one load run at one concurrency: ``LoadResult``'s and what the
    ``/v1/decide`` answers say."""

    workload: str = ""
    batch: int = 1
    #: Entities scored per second (rps x batch).
    eps: float = 0.0
    #: Per-row ``cache`` fields of the answers: in the measured window, and over every
    #: answer of the point (warm-up and drained included: "from an empty cache").
    cache_rows: dict[str, int] = field(default_factory=dict)
    cache_rows_all: dict[str, int] = field(default_factory=dict)
    hit_ratio: float | None = None
    hit_ratio_all: float | None = None
    #: ``X-Keel-Cache`` headers of the window's answers.
    cache_headers: dict[str, int] = field(default_factory=dict)
    #: Server-side ``timings_ms``, window only: p50 and p95 per stage; ``model_called``
    #: is over the answers whose model time was not zero (a row went to the model).
    timings_p50: dict[str, float] = field(default_factory=dict)
    timings_p95: dict[str, float] = field(default_factory=dict)
    model_called: int = 0
    model_called_p50: float | None = None
    model_called_p95: float | None = None


def hit_ratio(rows: Counter[str]) -> float | None:
    """(hit + shared) / (hit + shared + miss); "off" rows are not counted."""
    hits = rows["hit"] + rows["shared"]
    total = hits + rows["miss"]
    return hits / total if total else None


@dataclass
class DecideTally:
    """What the answers say, besides ``Tally``'s figures."""

    timings: list[tuple[float, ...]] = field(default_factory=list)
    rows: Counter[str] = field(default_factory=Counter)
    rows_all: Counter[str] = field(default_factory=Counter)
    headers: Counter[str] = field(default_factory=Counter)


async def _worker(session: aiohttp.ClientSession, url: str, bodies: BodySequence[bytes],
                  tally: Tally, answers: DecideTally, timeout: aiohttp.ClientTimeout) -> None:
    headers = {"Content-Type": "application/json"}
    while True:
        sent = time.perf_counter()
        if sent >= tally.end:
            return
        body = bodies.take(0)
        status: str
        detail = ""
        answer: dict[str, Any] | None = None
        cache_header = ""
        try:
            async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                payload = await resp.read()
                status = str(resp.status)
                if resp.status == 200:
                    cache_header = resp.headers.get("X-Keel-Cache", "")
                else:
                    detail = payload[:500].decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            status = type(exc).__name__
            detail = str(exc)[:500]
        done = time.perf_counter()
        if status == "200":
            try:
                answer = json.loads(payload)
                row_statuses = [r["cache"] for r in answer["results"]]
            except (ValueError, KeyError, TypeError) as exc:
                status, detail, answer = "bad answer", f"{exc}: {payload[:300]!r}", None
            else:
                answers.rows_all.update(row_statuses)
        if not status.isdigit():
            await asyncio.sleep(0.01)  # a refused connection fails at once: do not spin
        tally.record(sent, done, status, answer is not None, detail)
        if answer is not None and tally.start <= done <= tally.end:
            answers.rows.update(row_statuses)
            answers.headers[cache_header] += 1
            t = answer.get("timings_ms") or {}
            answers.timings.append(tuple(float(t.get(k, np.nan)) for k in STAGES))


async def run_decide_load(url: str, workload: Workload, concurrency: int, duration_s: float,
                          warmup_s: float = 2.0, request_timeout_s: float = 30.0) -> DecideResult:
    """Run ``concurrency`` closed-loop workers over ``workload`` and summarise the window."""
    if concurrency < 1 or duration_s <= 0 or warmup_s < 0:
        raise ValueError("concurrency >= 1, duration_s > 0 and warmup_s >= 0 are required")
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency,
                                     force_close=False, enable_cleanup_closed=True)
    # One sequence for all workers: the servers see the same entities in the same order.
    sequence = BodySequence(workload.bodies, 1, shared=True)
    answers = DecideTally()
    async with aiohttp.ClientSession(connector=connector) as session:
        begin = time.perf_counter()
        tally = Tally(begin + warmup_s, begin + warmup_s + duration_s)
        await asyncio.gather(*(_worker(session, url, sequence, tally, answers, timeout)
                               for _ in range(concurrency)))
    result = DecideResult(url=url, workload=workload.name, batch=workload.batch,
                          concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s)
    summarise_window(result, tally, sequence)
    result.eps = result.rps * workload.batch
    result.cache_rows = dict(sorted(answers.rows.items()))
    result.cache_rows_all = dict(sorted(answers.rows_all.items()))
    result.hit_ratio = hit_ratio(answers.rows)
    result.hit_ratio_all = hit_ratio(answers.rows_all)
    result.cache_headers = dict(sorted(answers.headers.items()))
    if answers.timings:
        table = np.asarray(answers.timings, dtype=np.float64)
        for i, stage in enumerate(STAGES):
            column = table[:, i][~np.isnan(table[:, i])]
            if column.size:
                found = percentiles(column, (50, 95), suffix="")
                result.timings_p50[stage] = found["p50"] or 0.0
                result.timings_p95[stage] = found["p95"] or 0.0
        called = table[:, STAGES.index("model")]
        called = called[called > 0]
        result.model_called = int(called.size)
        found = percentiles(called, (50, 95), suffix="")
        result.model_called_p50, result.model_called_p95 = found["p50"], found["p95"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000/v1/decide")
    parser.add_argument("--workload", choices=WORKLOADS, default="zipf")
    parser.add_argument("--concurrency", "-c", type=int, nargs="+", default=[8])
    parser.add_argument("--batch", type=int, default=1, help="entities per request")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--model", default="risk_mlp")
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    install_fast_loop()
    workload = make_workload(args.workload, model=args.model, batch=args.batch, seed=args.seed,
                             zipf_s=args.zipf_s)
    print_results([asyncio.run(run_decide_load(args.url, workload, c, args.duration,
                                                args.warmup, args.timeout)).to_dict()
                   for c in args.concurrency])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
