"""What the prompt cache saves: upstream calls, dollars and latency, with vs without it.

Replays a prompt mix with Zipf repetition (``--requests`` draws over ``--prompts``
distinct deterministic prompts, exponent ``--zipf``) through Keel's ``ChatGateway``
(the LLM gateway's core, as the ``LLMGateway`` replica runs it, prompt cache in the
machine's Redis under a private prefix that is deleted afterwards) against the
test suite's OpenAI-compatible upstream (graph/demo/llm_upstream.py, a real HTTP server in
a thread) with a fixed ``--delay-ms`` per call. Runs the mix twice, cache off and on,
at ``--concurrency``, and measures the latency of a direct upstream call, a gateway
miss and a gateway hit one at a time. Writes ``results/<timestamp>-llm-cache.json``.

    .venv/bin/python bench/llm_cache.py
    .venv/bin/python bench/llm_cache.py --requests 300 --prompts 100 --delay-ms 100
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
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployments.cache.core import redis_store  # noqa: E402
from deployments.llm.core import ChatCall, ChatGateway, LLMGatewayConfig  # noqa: E402
from graph.demo.llm_upstream import FakeUpstream  # noqa: E402

PRICE = {"input_per_1k": 0.00015, "output_per_1k": 0.0006}  # a small hosted model's list price


def prompts(n: int) -> list[str]:
    topics = ["margin call", "VaR", "stress test", "liquidity", "exposure", "hedge ratio",
              "drawdown", "beta", "duration", "convexity"]
    return [f"Explain {topics[i % len(topics)]} for portfolio {i:04d} in two sentences, "
            f"with one example." for i in range(n)]


def zipf_mix(n_requests: int, n_prompts: int, exponent: float, seed: int) -> list[int]:
    ranks = np.arange(1, n_prompts + 1, dtype=np.float64)
    weights = ranks ** -exponent
    weights /= weights.sum()
    return [int(i) for i in np.random.default_rng(seed).choice(n_prompts, n_requests,
                                                                p=weights)]


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
                 concurrency: int) -> dict[str, Any]:
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

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    usage = (await gateway.usage())["tenants"]["bench"]
    return {"requests": len(mix), "statuses": statuses, "wall_s": round(elapsed, 2),
            "latency_ms_p50": round(statistics.median(latencies), 2),
            "latency_ms_p95": round(float(np.percentile(latencies, 95)), 2),
            "cost_usd": usage["cost_usd"], "cost_avoided_usd": usage["cost_avoided_usd"],
            "tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


async def latency(gateway: ChatGateway, url: str, n: int) -> dict[str, float]:
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
            "hit_ms_p95": round(float(np.percentile(hit, 95)), 3)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    upstream = FakeUpstream(delay_s=args.delay_ms / 1000).start()
    texts = prompts(args.prompts)
    mix = zipf_mix(args.requests, args.prompts, args.zipf, args.seed)
    results: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "distinct_prompts_drawn": len(set(mix)), "price_per_1k": PRICE}
    prefixes = []
    try:
        for name, enabled in (("without_cache", False), ("with_cache", True)):
            prefix = f"keelbench:llm:{uuid.uuid4().hex[:8]}:"
            prefixes.append(prefix)
            store = redis_store(args.redis_url)
            gateway = ChatGateway(store, config(upstream.url, prefix, enabled))
            before = upstream.chat_calls()
            results[name] = await replay(gateway, texts, mix, args.concurrency)
            results[name]["upstream_calls"] = upstream.chat_calls() - before
            if enabled:
                results["latency"] = await latency(gateway, upstream.url, args.probes)
            await gateway.aclose()
            await store.client.aclose()
    finally:
        upstream.stop()
        with redis.Redis.from_url(args.redis_url) as client:
            for prefix in prefixes:
                keys = list(client.scan_iter(match=prefix + "*"))
                if keys:
                    client.unlink(*keys)
    off, on = results["without_cache"], results["with_cache"]
    results["savings"] = {
        "upstream_calls_ratio": round(on["upstream_calls"] / off["upstream_calls"], 4),
        "cost_ratio": round(on["cost_usd"] / off["cost_usd"], 4) if off["cost_usd"] else None,
        "hit_ratio": round(on["statuses"].get("hit", 0) / on["requests"], 4)}
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--delay-ms", type=float, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    arguments = parser.parse_args()
    summary = asyncio.run(main(arguments))
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = Path(arguments.out) / f"{stamp}-llm-cache.json"
    target.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {target}")
