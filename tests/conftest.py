"""Shared fixtures. Unit tests request none of the Ray ones and start nothing.

Integration tests share ONE Ray instance and ONE Keel application per session,
deployed from serve_config.yaml through the same controller call that
``serve run serve_config.yaml`` makes, with test-sized overrides (replicas at
``num_cpus: 0``, one replica each, a model repository built into a temp dir).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.modelkit import write_linear_model
from tests.support.redisserver import PrivateRedis, quiet_port
from tests.support.serve_app import (
    PROJECT_ROOT,
    SERVE_ENV,
    KeelApp,
    copy_feature_repo,
    serve_test_config,
)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models (small training set) plus a linear test model in versions 1 and 2."""
    from graph.demo.build import build_demo_repository
    from graph.demo.dataset import DatasetConfig

    root = tmp_path_factory.mktemp("models")
    build_demo_repository(root, config=DatasetConfig(n_train_rows=4000))
    write_linear_model(root, "linear", "1", n_features=4, seed=1)
    write_linear_model(root, "linear", "2", n_features=4, seed=2)
    return root


@pytest.fixture(scope="session")
def feature_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's Feast repository on the embedded default store, prepared from the same
    seeded generator as ``model_repo``'s models (SQLite online store)."""
    from graph.demo.dataset import DatasetConfig
    from graph.demo.feast_store import prepare_feature_store

    root = copy_feature_repo(tmp_path_factory.mktemp("feast"))
    prepare_feature_store(root, dataset_config=DatasetConfig(n_train_rows=4000))
    return root


@pytest.fixture(scope="session")
def cache_redis() -> Iterator[PrivateRedis]:
    """The test application's prediction-cache Redis: private, so a test may stop it."""
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def serve_client() -> Iterator[Any]:
    """One Ray instance and one Serve instance for the whole test session."""
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start

    port = quiet_port()
    # The mode `make demo` runs in (docs/architecture.md): Ray reads these when its processes
    # start.
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    # HAProxy's metrics and stats ports are fixed by default (9101, 8404): free ones let
    # a second test session (or a running demo) share the machine.
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(quiet_port()))
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(quiet_port()))
    metrics_port = quiet_port()
    ray.init(num_cpus=4, include_dashboard=False, namespace="serve",
             runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}},
             log_to_driver=False, _metrics_export_port=metrics_port)
    grpc_port = quiet_port()
    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    client = serve_start(http_options={"host": "127.0.0.1", "port": port},
                         grpc_options={**config["grpc_options"], "port": grpc_port})
    client.test_port = port
    client.grpc_port = grpc_port  # HAProxy's gRPC frontend (serve_config.yaml grpc_options)
    client.metrics_port = metrics_port  # Ray's Prometheus endpoint on this node
    try:
        yield client
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def keel_app(serve_client: Any, model_repo: Path, feature_repo: Path,
             cache_redis: PrivateRedis) -> KeelApp:
    config = serve_test_config(model_repo, feature_repo, cache_redis.url)
    app = KeelApp(base_url=f"http://127.0.0.1:{serve_client.test_port}", config=config,
                  client=serve_client)
    app.deploy(config, timeout_s=180)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(f"{app.base_url}/v2/health/ready", timeout=5).status_code == 200:
            break
        time.sleep(0.5)
    return app


@pytest.fixture
def http(keel_app: KeelApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keel_app.base_url, timeout=30) as client:
        yield client
