"""``FeatureService``: the Ray Serve shell around ``FeatureFetcher`` (batching, timeouts).

Concurrent lookups are merged with ``@serve.batch`` into one ``get_online_features``
call. Each request is validated on its own first, so one bad request never fails
the batch it would have joined. The Feast client is blocking; it runs on one
worker thread with a deadline, so a store that does not answer costs a 503, not
a hung request.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from deployments.errors import (
    DependencyUnavailable,
    KeelError,
    UpstreamTimeout,
    parse_user_config,
)
from deployments.features.core import FeatureFetcher, FeatureRows, FeatureServiceConfig
from deployments.observability import catalog, tracing
from deployments.observability.ray_metrics import make
from deployments.observability.replica import observe_replica

log = logging.getLogger(__name__)

Lookup = tuple[list[dict[str, Any]], list[str]]


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
class FeatureService:
    """Online features for entity keys, from the Feast repository at ``repo_path``."""

    def __init__(self, repo_path: str, fs_yaml: str | None = None) -> None:
        observe_replica()  # span attributes, Pyroscope (after the replica started)
        # Built here, inside the replica: a FeatureStore is never pickled.
        self._fetcher = FeatureFetcher(repo_path, fs_yaml)
        self._config = FeatureServiceConfig()
        # One thread: the Feast client's connections are not shared across threads, and
        # lookups are merged into batches anyway.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feast")
        # Warm up on the thread that will serve the lookups (its connections, Feast's
        # lazy imports): a fresh replica's first lookup took seconds without this.
        warm_s = self._pool.submit(self._fetcher.warm_up).result()
        log.info("feature store warmed up in %.2f s", warm_s)
        self._batch_sizes: Counter[int] = Counter()
        self._failures = 0
        self._age = make(catalog.FEATURE_AGE)
        self._batch_metric = make(catalog.FEATURE_BATCH_SIZE)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = parse_user_config(FeatureServiceConfig, user_config, "FeatureService")
        self._lookup_batch.set_max_batch_size(config.max_batch_size)  # type: ignore[attr-defined]
        self._lookup_batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            config.batch_wait_timeout_s)
        self._config = config

    async def lookup(self, entities: list[dict[str, Any]], features: list[str],
                     trace: dict[str, str] | None = None) -> FeatureRows:
        """Feature values of ``entities`` in ``features`` order (404 for an unknown entity).

        ``trace``: the caller's W3C trace context, for the batch span's links (Ray Serve
        carries the parent context itself).
        """
        self._fetcher.validate(entities, features)
        [result] = await self._lookup_batch(([(entities, features)], [trace]))
        if isinstance(result, KeelError):
            raise result
        return result

    async def lookup_many(self, lookups: list[Lookup],
                          traces: list[dict[str, str] | None] | None = None
                          ) -> list[FeatureRows | KeelError]:
        """Many lookups an ingress coalesced into one call: each gets its rows or its own
        error (an invalid one, or one naming an unknown entity, fails alone)."""
        return await self._lookup_batch((lookups, traces or [None] * len(lookups)))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _lookup_batch(self, items: list[tuple[list[Lookup], list[dict[str, str] | None]]]
                            ) -> list[list[FeatureRows | KeelError]]:
        # Each item is one handle call's lookups (one for lookup(), many for lookup_many()).
        requests = [lookup for lookups, _ in items for lookup in lookups]
        traces = [trace for _, item_traces in items for trace in item_traces]
        self._batch_sizes[len(requests)] += 1
        self._batch_metric.observe(len(requests))
        timeout = self._config.lookup_timeout_s
        loop = asyncio.get_running_loop()
        results: list[FeatureRows | KeelError]
        try:
            # A child of the batch's first request (Serve's choice), linking every request.
            with tracing.span("keel.features.batch",
                              {"keel.batch.size": len(requests),
                               "keel.entities": sum(len(e) for e, _ in requests)},
                              links=tracing.links(traces)):
                # The store's own calls (Redis commands) are children of this span.
                call = loop.run_in_executor(self._pool, contextvars.copy_context().run,
                                            self._fetcher.lookup_many, requests)
                results = await asyncio.wait_for(call, timeout)
            self._record_ages(results)
        except TimeoutError:
            self._failures += 1
            error = UpstreamTimeout(f"the feature store did not answer within {timeout} s "
                                    f"(lookup_timeout_s)").at("features")
            results = [error] * len(requests)
        except Exception as exc:  # the store failed outside lookup_many's own handling
            self._failures += 1
            log.error("feature lookup failed: %r", exc)
            results = [DependencyUnavailable(f"the feature store failed: {type(exc).__name__}",
                                             retry_after_s=1)] * len(requests)
        split: list[list[FeatureRows | KeelError]] = []
        start = 0
        for lookups, _ in items:
            split.append(results[start:start + len(lookups)])
            start += len(lookups)
        return split

    def _record_ages(self, results: list[FeatureRows | KeelError]) -> None:
        now = time.time()
        oldest: dict[str, float] = {}
        for result in results:
            if isinstance(result, FeatureRows):
                for view, age in result.ages_s(now).items():
                    oldest[view] = max(age, oldest.get(view, 0.0))
        for view, age in oldest.items():
            self._age.set(age, tags={"feature_view": view})

    async def stats(self) -> dict[str, Any]:
        """Batch sizes and failures so far (for tests and the benchmark)."""
        return {"batch_sizes": dict(self._batch_sizes), "failures": self._failures,
                "config": self._config.model_dump()}
