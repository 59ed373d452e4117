"""The ``/v1/decide`` baseline: Keel's cores in one uvicorn process, no Ray.

The same work per request as Keel's ingress, with the same code for every step
except the hops: it IS Keel's ingress app (``create_app``: body limit, pydantic
contract, entity checks, the same Feast repository, input assembly in the model's
column order, the prediction cache over Redis, ``DecideResponse`` with the same
``X-Keel-Cache`` header and ``timings_ms``), over in-process backends: the
``FeatureFetcher`` called in-line instead of the FeatureService deployment, and every
model placed in the process (``EmbeddedModels``, as Keel's ingress runs its in-ingress
models). (Until 2026-11-27 16:30 this file held a copy of the route; the
2026-11-27 figures were measured with that copy, which did the same steps.)

What differs is only how it is served: one process, one event loop, the feature
lookup and the model called in-line (each takes well under a millisecond for
one row here, so a thread hop would cost more than it saves), no micro-batching.
The cache keys get their own prefix (``--key-prefix``), so the benchmark can
empty this server's keys without touching Keel's.

    .venv/bin/python -m bench.harness.baseline_decide --port 8300 --key-prefix keelbench:baseline:
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from bench.harness.report import REPO_ROOT
from deployments.cache.core import PredictionCache
from deployments.cache.policy import CacheConfig
from deployments.errors import KeelError
from deployments.features.core import FeatureFetcher, FeatureRows
from deployments.ingress.pool.placement import EmbeddedModels, ModelPool
from deployments.ingress.rest.app import IngressConfig
from deployments.ingress.rest.app import create_app as create_ingress_app
from deployments.onnx.core import OnnxModelConfig, RuntimeOptions
from deployments.repository import ModelRepository
from deployments.storage.remote import redis_store_from_env


class LocalFeatures:
    """Keel's ``FeatureBackend`` over an in-process ``FeatureFetcher`` (no hop, no thread:
    one row's lookup takes well under a millisecond here)."""

    def __init__(self, fetcher: FeatureFetcher) -> None:
        self.fetcher = fetcher

    async def lookup_many(self, lookups: list[tuple[list[dict[str, Any]], list[str]]],
                          traces: list[dict[str, str] | None]
                          ) -> Sequence[FeatureRows | KeelError]:
        return self.fetcher.lookup_many(lookups)


def create_app(models_root: Path, feature_repo: str, fs_yaml: str | None,
               key_prefix: str) -> FastAPI:
    """Keel's own ingress app (``deployments.ingress.rest.app.create_app``: the same routes,
    validation, cache and answer) over in-process models and features."""
    repository = ModelRepository(models_root)
    # Every model in this process, as Keel's ingress runs the models placed in it, with the
    # same runtime options serve_config.yaml gives them.
    embedded = EmbeddedModels(repository, repository.model_names())
    runtime = OnnxModelConfig(runtime=RuntimeOptions(intra_op_num_threads=1))
    embedded.apply({name: runtime for name in embedded.model_names()})
    features = LocalFeatures(FeatureFetcher(feature_repo, fs_yaml))
    config = IngressConfig(cache=CacheConfig(key_prefix=key_prefix))
    cache = PredictionCache(redis_store_from_env(), config.cache)
    app = create_ingress_app(ModelPool(embedded, None), lambda: config, cache=cache,
                             features=features)
    app.title = "baseline /v1/decide"
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Single-process /v1/decide baseline")
    parser.add_argument("--repository", default=str(REPO_ROOT / "models"))
    parser.add_argument("--feature-repo", default=str(REPO_ROOT / "configs" / "feast"))
    parser.add_argument("--feature-store-yaml", default=None)
    parser.add_argument("--key-prefix", default="keelbench:baseline:",
                        help="prediction cache key prefix in Redis (KEEL_REDIS_URL)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="uvicorn's access log (on by default, as a user would leave it)")
    args = parser.parse_args(argv)
    app = create_app(Path(args.repository), args.feature_repo, args.feature_store_yaml,
                     args.key_prefix)
    uvicorn.run(app, host=args.host, port=args.port, access_log=args.access_log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
