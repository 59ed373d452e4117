"""What the prompt cache saves: upstream calls, dollars and latency, with vs without it.

Replays a prompt mix with Zipf repetition (``--requests`` draws over ``--prompts``
distinct deterministic prompts, exponent ``--zipf``) through Keel's ``ChatGateway``
(the LLM gateway's core, as the ``LLMGateway`` replica runs it, prompt cache in the
machine's Redis under a private prefix that is deleted afterwards) against the
test suite's OpenAI-compatible upstream (graph/demo/llm_upstream.py, a real HTTP server in
a thread) with a fixed ``--delay-ms`` per call. Runs the mix twice, cache off and on,
at ``--concurrency``, and measures the latency of a direct upstream call, a gateway
miss and a gateway hit one at a time. Writes ``results/<timestamp>-llm-cache.json`` and
``.png`` (upstream calls, cost and latency with and without the cache).

    .venv/bin/python -m bench.llm_cache
    .venv/bin/python -m bench.llm_cache --requests 300 --prompts 100 --delay-ms 100
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.harness.cache_keys import delete_prefix, redis_client
from bench.harness.http_load import zipf_indices
from bench.harness.progress import Progress, log
from bench.harness.report import RESULTS_DIR, pyplot, rel, save_figure
from bench.harness.statistics import median_or_none, percentiles
from deployments.llm.chat import ChatCall
from deployments.llm.config import LLMGatewayConfig
from deployments.llm.gateway import ChatGateway
from deployments.storage.remote import redis_store
from graph.demo.llm_upstream import FakeUpstream

PRICE = {"input_per_1k": 0.00015, "output_per_1k": 0.0006}  # a small hosted model's list price


def prompts(n: int) -> list[str]:
    topics = ["margin call", "VaR", "stress test", "liquidity", "exposure", "hedge ratio",
              "drawdown", "beta", "duration", "convexity"]
    return [f"Explain {topics[i % len(topics)]} for portfolio {i:04d} in two sentences, "
            f"with one example." for i in range(n)]


def zipf_mix(n_requests: int, n_prompts: int, exponent: float, seed: int) -> list[int]:
    """``n_requests`` prompt indices, prompt k drawn with P proportional to (k+1)^-exponent."""
    picks = zipf_indices(np.random.default_rng(seed), n_prompts, n_requests, exponent)
    return [int(i) for i in picks]


def config(url: str, prefix: str, enabled: bool) -> LLMGatewayConfig:
    return LLMGatewayConfig.model_validate({
        "upstreams": [{"name": "bench", "base_url": url, "models": {"small": "small-model"},
                       "max_concurrency": 256, "timeout_s": 30,
                       "prices": {"small": PRICE}}],
        "cache": {"enabled": enabled, "key_prefix": prefix}})


def call(text: str) -> ChatCall:
    return ChatCall(body={"model": "small", "temperature": 0,
                          "messages": [{"role": "user", "content": text}]},
                    tenant="bench", user="u1")


async def replay(gateway: ChatGateway, texts: list[str], mix: list[int],
                 concurrency: int, progress: Progress) -> dict[str, Any]:
    queue = list(mix)
    statuses: dict[str, int] = {}
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            i = queue.pop()
            started = time.perf_counter()
            answer = await gateway.complete(call(texts[i]))
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[answer.cache] = statuses.get(answer.cache, 0) + 1
            progress.advance()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    usage = (await gateway.usage())["tenants"]["bench"]
    return {"requests": len(mix), "statuses": statuses, "wall_s": round(elapsed, 2),
            "latency_ms_p50": round(median_or_none(latencies) or 0.0, 2),
            "latency_ms_p95": percentiles(latencies, (95,), digits=2)["p95_ms"],
            "cost_usd": usage["cost_usd"], "cost_avoided_usd": usage["cost_avoided_usd"],
            "tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


async def latency(gateway: ChatGateway, url: str, n: int) -> dict[str, float | None]:
    """One at a time: a direct upstream call, a gateway miss, a gateway hit (p50, ms)."""
    direct, miss, hit = [], [], []
    async with httpx.AsyncClient(base_url=url) as client:
        for i in range(n):
            body = call(f"latency probe {i} {uuid.uuid4().hex}").body
            started = time.perf_counter()
            (await client.post("/chat/completions", json={**body, "model": "small-model"})
             ).raise_for_status()
            direct.append((time.perf_counter() - started) * 1000)
            text = f"gateway probe {i} {uuid.uuid4().hex}"
            started = time.perf_counter()
            assert (await gateway.complete(call(text))).cache == "miss"
            miss.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            assert (await gateway.complete(call(text))).cache == "hit"
            hit.append((time.perf_counter() - started) * 1000)
    p50 = statistics.median
    return {"direct_upstream_ms_p50": round(p50(direct), 2),
            "gateway_miss_ms_p50": round(p50(miss), 2),
            "gateway_hit_ms_p50": round(p50(hit), 3),
            "miss_overhead_ms_p50": round(p50(miss) - p50(direct), 2),
            "hit_ms_p95": percentiles(hit, (95,), digits=3)["p95_ms"]}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    upstream = FakeUpstream(delay_s=args.delay_ms / 1000).start()
    texts = prompts(args.prompts)
    mix = zipf_mix(args.requests, args.prompts, args.zipf, args.seed)
    results: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "distinct_prompts_drawn": len(set(mix)), "price_per_1k": PRICE}
    prefixes: list[str] = []
    try:
        with Progress("llm_cache", 2 * args.requests, unit="requests") as progress:
            await replay_both(args, upstream, texts, mix, results, prefixes, progress)
    finally:
        upstream.stop()
        client = redis_client(args.redis_url)
        for prefix in prefixes:
            delete_prefix(client, prefix)
        client.close()
    off, on = results["without_cache"], results["with_cache"]
    results["savings"] = {
        "upstream_calls_ratio": round(on["upstream_calls"] / off["upstream_calls"], 4),
        "cost_ratio": round(on["cost_usd"] / off["cost_usd"], 4) if off["cost_usd"] else None,
        "hit_ratio": round(on["statuses"].get("hit", 0) / on["requests"], 4)}
    return results


async def replay_both(args: argparse.Namespace, upstream: FakeUpstream, texts: list[str],
                      mix: list[int], results: dict[str, Any], prefixes: list[str],
                      progress: Progress) -> None:
    """The mix with the cache off, then on (and the one-at-a-time latencies)."""
    for name, enabled in (("without_cache", False), ("with_cache", True)):
        prefix = f"keelbench:llm:{uuid.uuid4().hex[:8]}:"
        prefixes.append(prefix)
        store = redis_store(args.redis_url)
        gateway = ChatGateway(store, config(upstream.url, prefix, enabled))
        before = upstream.chat_calls()
        progress.step(name.replace("_", " "))
        results[name] = await replay(gateway, texts, mix, args.concurrency, progress)
        results[name]["upstream_calls"] = upstream.chat_calls() - before
        if enabled:
            results["latency"] = await latency(gateway, upstream.url, args.probes)
        await gateway.aclose()
        await store.client.aclose()


def plot(results: dict[str, Any], path: Path) -> None:
    """Upstream calls, cost and p50/p95 latency without and with the prompt cache."""
    runs = {"without cache": results["without_cache"], "with cache": results["with_cache"]}
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    names = list(runs)
    for ax, (title, values) in zip(axes, (
            ("upstream calls", [r["upstream_calls"] for r in runs.values()]),
            ("cost, USD", [r["cost_usd"] for r in runs.values()]),
            ("latency p50 / p95, ms", None)), strict=True):
        if values is None:
            xs = np.arange(len(names))
            ax.bar(xs - 0.2, [r["latency_ms_p50"] for r in runs.values()], 0.4, label="p50")
            ax.bar(xs + 0.2, [r["latency_ms_p95"] for r in runs.values()], 0.4, label="p95")
            ax.set_xticks(xs, names)
            ax.legend(fontsize=8)
        else:
            ax.bar(names, values, color=["tab:grey", "tab:green"])
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    config = results["config"]
    save_figure(fig, path, f"LLM prompt cache: {config['requests']} requests over "
                f"{config['prompts']} prompts (Zipf {config['zipf']:g}), upstream "
                f"{config['delay_ms']:g} ms, {config['concurrency']} concurrent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--delay-ms", type=float, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(measure(args))
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = Path(args.out) / f"{stamp}-llm-cache.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, target.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    log(f"wrote {rel(target)} and {rel(target.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
