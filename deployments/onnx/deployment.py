"""``OnnxModel``: the Ray Serve shell around ``ModelVersions`` (batching, reconfigure)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import Any

from ray import serve

from deployments.contracts import InferCall, InferResult, ModelStatus
from deployments.errors import ConfigError, KeelError, parse_user_config
from deployments.observability import catalog, tracing
from deployments.observability.ray_metrics import make
from deployments.observability.replica import (
    observe_replica,
    replica_max_ongoing_requests,
    replica_user_config,
)
from deployments.onnx.core import ModelVersions, OnnxModelConfig
from deployments.repository import ModelRepository

log = logging.getLogger(__name__)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class OnnxModel:
    """One model of the repository, micro-batched with ``@serve.batch``.

    The same class serves every model; the graph binds it once per model with
    ``.options(name=<model>)``. ``user_config`` (``OnnxModelConfig``) picks the
    version, the batch size and wait, and the ONNX Runtime options, live.
    """

    def __init__(self, model_name: str, repository: str) -> None:
        observe_replica(model_name)  # span attributes, Pyroscope (after the replica started)
        self._name = model_name
        self._versions = ModelVersions(ModelRepository(repository), model_name)
        # Load the version user_config pins, not the latest: a replica that starts (a
        # replacement, a scale-up) while a newer, broken or half-copied version sits in the
        # repository must come up on the pinned one. reconfigure() then finds it loaded.
        self._config = parse_user_config(OnnxModelConfig, replica_user_config(), model_name)
        self._batch_sizes: Counter[int] = Counter()
        self._reloads = 0
        self._aside_calls = 0
        self._batch_metric = make(catalog.MODEL_BATCH_SIZE)
        self._loads_metric = make(catalog.MODEL_LOADS)
        self._versions.apply(self._config)
        self._count_load()

    def _count_load(self) -> None:
        current = self._versions.current
        if current is not None:
            self._loads_metric.inc(1, tags={"model": self._name, "version": current.version})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply new live settings; a new version loads before it replaces the old one."""
        config = parse_user_config(OnnxModelConfig, user_config, self._name)
        config.check_max_ongoing_requests(replica_max_ongoing_requests())
        if self._versions.apply(config):
            self._reloads += 1
            self._count_load()
        # @serve.batch adds these setters; its type stub does not say so.
        self._infer_batch.set_max_batch_size(config.max_batch_size)  # type: ignore[attr-defined]
        self._infer_batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            config.batch_wait_timeout_s)
        self._config = config
        current = self._versions.current
        log.info("model %s: serving version %s, max_batch_size=%d, batch_wait_timeout_s=%s",
                 self._name, current.version if current else None, config.max_batch_size,
                 config.batch_wait_timeout_s)

    async def infer(self, call: InferCall) -> InferResult:
        """Answer one request; it shares an ONNX Runtime call with concurrent ones."""
        [result] = await self._infer_batch([call])
        if isinstance(result, KeelError):
            raise result
        return result

    async def infer_many(self, calls: list[InferCall]) -> list[InferResult | KeelError]:
        """Answer the requests an ingress coalesced into one handle call, each with its own
        result or its own error; they share ONNX Runtime calls with concurrent callers."""
        return await self._infer_batch(calls)

    async def infer_aside(self, calls: list[InferCall]) -> list[InferResult | KeelError]:
        """Answer shadow copies of requests: never in a live batch, in a thread (ONNX
        Runtime releases the GIL), so a slow shadow version does not hold live batches."""
        self._aside_calls += len(calls)
        return await asyncio.to_thread(self._versions.infer_batch, calls)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _infer_batch(self, groups: list[list[InferCall]]
                           ) -> list[list[InferResult | KeelError]]:
        # Each item is one handle call's requests (one for infer(), many for infer_many()).
        # max_batch_size bounds the requests of one ONNX Runtime call, however many arrived.
        calls = [call for group in groups for call in group]
        size = self._config.max_batch_size
        chunks = [calls[start:start + size] for start in range(0, len(calls), size)]
        answers: list[InferResult | KeelError] = []
        for chunk in chunks:
            self._batch_sizes[len(chunk)] += 1
            self._batch_metric.observe(len(chunk), tags={"model": self._name})
            # Serve runs the batch in its first request's context: the span is that
            # request's child and links every request it answers (each call's carrier).
            with tracing.span("keel.model.batch",
                              {"keel.model": self._name, "keel.batch.size": len(chunk)},
                              links=tracing.links([c.trace for c in chunk])):
                answers += self._versions.infer_batch(chunk)
        split: list[list[InferResult | KeelError]] = []
        start = 0
        for group in groups:
            split.append(answers[start:start + len(group)])
            start += len(group)
        return split

    async def status(self) -> ModelStatus:
        """What is loaded and served; the ingress validates requests against it."""
        return self._versions.status()

    async def stats(self) -> dict[str, Any]:
        """Batch sizes seen so far and reload count (for tests and the benchmark)."""
        return {"batch_sizes": dict(self._batch_sizes), "reloads": self._reloads,
                "aside_calls": self._aside_calls,
                "pid": os.getpid(),
                "config": self._config.model_dump()}

    def check_health(self) -> None:
        if self._versions.current is None:
            raise ConfigError(f"model {self._name!r} has no version loaded")
