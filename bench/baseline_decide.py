"""The ``/v1/decide`` baseline: Keel's cores in one uvicorn process, no Ray.

The same work per request as Keel's ingress, with the same code for every step
except the hops: parse the body with Keel's pydantic contract (``DecideRequest``),
check the entities against the model's feature views (``FeatureFetcher.validate``),
read the features from the same Feast repository (``FeatureFetcher.lookup``),
assemble the model's input row in its declared column order, answer the rows
from the prediction cache (``PredictionCache`` over Redis, via Keel's
``Predictor``) and send only the misses to ONNX Runtime (``ModelVersions``, the
core of the ``OnnxModel`` deployment), then answer Keel's ``DecideResponse`` with
the same ``X-Keel-Cache`` header and ``timings_ms``.

What differs is only how it is served: one process, one event loop, the feature
lookup and the model called in-line (each takes well under a millisecond for
one row here, so a thread hop would cost more than it saves), no micro-batching.
The cache keys get their own prefix (``--key-prefix``), so the benchmark can
empty this server's keys without touching Keel's.

    .venv/bin/python bench/baseline_decide.py --port 8300 --key-prefix keelbench:baseline:
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from deployments.cache.core import CacheConfig, PredictionCache, redis_store
from deployments.contracts import (
    DecideRequest,
    DecideResponse,
    DecideTimings,
    Decision,
    InferCall,
    InferResult,
    ModelStatus,
)
from deployments.errors import InvalidInput, KeelError, ModelNotFound, field_errors
from deployments.features.core import FeatureFetcher
from deployments.ingress.scoring import Predictor, summarise
from deployments.onnx.core import ModelVersions, OnnxModelConfig, RuntimeOptions
from deployments.repository import ModelRepository, ModelSpec, TensorSpec
from deployments.settings import RedisSettings

REPO_ROOT = Path(__file__).resolve().parent.parent


class LocalModels:
    """Keel's ``ModelBackend`` and ``SpecSource`` over in-process ``ModelVersions``."""

    def __init__(self, repository: ModelRepository, names: list[str]) -> None:
        # The same runtime options as serve_config.yaml gives every OnnxModel replica.
        config = OnnxModelConfig(runtime=RuntimeOptions(intra_op_num_threads=1))
        self.versions: dict[str, ModelVersions] = {}
        for name in names:
            versions = ModelVersions(repository, name)
            versions.apply(config)
            self.versions[name] = versions

    def _model(self, name: str) -> ModelVersions:
        versions = self.versions.get(name)
        if versions is None:
            raise ModelNotFound(f"model {name!r} is not served here "
                                f"(models: {sorted(self.versions)})")
        return versions

    # ModelBackend
    def model_names(self) -> list[str]:
        return sorted(self.versions)

    async def status(self, name: str, *, fresh: bool = False) -> ModelStatus:
        return self._model(name).status()

    async def infer(self, name: str, call: InferCall) -> InferResult:
        result = self._model(name).infer_batch([call])[0]
        if isinstance(result, KeelError):
            raise result
        return result

    # SpecSource
    async def spec(self, name: str, version: str | None) -> ModelSpec:
        return self._model(name).runner_for(version).spec

    def saw_version(self, name: str, version: str) -> None:
        """Nothing to invalidate: the versions live in this process."""


def decision_input(spec: ModelSpec) -> TensorSpec:
    """The input ``/v1/decide`` fills from features (the check Keel's ingress makes)."""
    featured = [t for t in spec.inputs if t.columns]
    if spec.decision is None or len(spec.inputs) != 1 or len(featured) != 1:
        raise InvalidInput(f"model: {spec.name!r} does not take one feature-store input "
                           "with a decision rule; /v1/decide cannot score it")
    return featured[0]


def error_response(exc: KeelError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


def create_app(models_root: Path, feature_repo: str, fs_yaml: str | None,
               key_prefix: str, max_entities: int = 256) -> FastAPI:
    """The baseline app; everything is built here, in the serving process."""
    repository = ModelRepository(models_root)
    models = LocalModels(repository, repository.model_names())
    fetcher = FeatureFetcher(feature_repo, fs_yaml)
    settings = RedisSettings()
    remote = redis_store(settings.url,
                         password=settings.password.get_secret_value()
                         if settings.password else None,
                         ssl_ca_certs=settings.ssl_ca_certs,
                         socket_timeout_s=settings.socket_timeout_s,
                         connect_timeout_s=settings.connect_timeout_s) if settings.url else None
    cache = PredictionCache(remote, CacheConfig(key_prefix=key_prefix))
    predictor = Predictor(models, models, cache, lambda: 30.0)
    app = FastAPI(title="baseline /v1/decide")

    @app.exception_handler(KeelError)
    async def _keel_error(_: Request, exc: KeelError) -> JSONResponse:
        return error_response(exc)

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/decide")
    async def decide(request: Request) -> Response:
        started = time.perf_counter()
        body = await request.body()
        try:
            ask = DecideRequest.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidInput("; ".join(field_errors(exc, limit=5))) from exc
        if len(ask.entities) > max_entities:
            raise InvalidInput(f"entities: at most {max_entities} entities per request")
        spec = await models.spec(ask.model, ask.version)
        tensor = decision_input(spec)
        columns = list(tensor.columns or [])
        began = time.perf_counter()
        fetcher.validate(ask.entities, columns)
        table = fetcher.lookup(ask.entities, columns)
        features_ms = (time.perf_counter() - began) * 1000
        values = np.asarray(table.values, dtype=tensor.numpy_dtype)
        if not tensor.allow_nan and not np.isfinite(values).all():
            row = int(np.argwhere(~np.isfinite(values))[0][0])
            raise InvalidInput(f"entities[{row}]: a feature value is not finite and model "
                               f"{spec.name!r} does not allow NaN")
        prediction = await predictor.predict(ask.model, spec.version, {tensor.name: values})
        timings = DecideTimings(features=round(features_ms, 3),
                                cache=round(prediction.cache_ms, 3),
                                model=round(prediction.model_ms, 3),
                                total=round((time.perf_counter() - started) * 1000, 3))
        rule = prediction.spec.decision
        assert rule is not None  # decision_input checked it
        scores = prediction.outputs[rule.output].reshape(len(ask.entities), -1)[:, rule.index]
        results = [Decision(entity=entity, score=float(score),
                            decision=bool(score >= rule.threshold), threshold=rule.threshold,
                            model=spec.name, model_version=prediction.version, cache=status,
                            timings_ms=timings)
                   for entity, score, status in zip(ask.entities, scores, prediction.cache,
                                                     strict=True)]
        answer = DecideResponse(model=spec.name, model_version=prediction.version,
                                results=results, timings_ms=timings)
        return Response(answer.model_dump_json(), media_type="application/json",
                        headers={"X-Keel-Cache": summarise(prediction.cache)})

    @app.get("/v1/cache")
    async def cache_state() -> dict[str, Any]:
        # The same shape as Keel's GET /v1/cache.
        counters = cache.counters
        names = sorted(set(counters.hits) | set(counters.misses) | set(counters.shared))
        return {
            "enabled": cache.config.enabled,
            "remote": "up" if cache.remote_available else
                      ("none" if cache.remote is None else "down"),
            "config": cache.config.model_dump(),
            "errors": counters.errors,
            "corrupt": counters.corrupt,
            "local_entries": len(cache.local),
            "models": {m: {"hits": counters.hits.get(m, 0), "misses": counters.misses.get(m, 0),
                           "shared": counters.shared.get(m, 0),
                           "hit_ratio": counters.hit_ratio(m)} for m in names},
        }

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
