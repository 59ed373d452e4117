"""Shared fixtures. Unit tests request none of the Ray ones and start nothing.

Integration tests share ONE Ray instance and ONE Keel application per session,
deployed from serve_config.yaml through the same controller call that
``serve run serve_config.yaml`` makes, with test-sized overrides (replicas at
``num_cpus: 0``, one replica each, a model repository built into a temp dir).
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.modelkit import write_linear_model
from tests.redisserver import PrivateRedis, free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: Ray Serve's throughput-optimised mode with HAProxy on the HTTP port, as `make demo` runs.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
             # Tests only: do not wait Ray's 30 s for direct-ingress connections to drain.
             "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
APP_NAME = "keel"


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


def copy_feature_repo(target: Path) -> Path:
    """configs/feast (definitions and yaml files, not its generated data) into ``target``."""
    shutil.copytree(PROJECT_ROOT / "configs" / "feast", target,
                    ignore=shutil.ignore_patterns("data", "__pycache__"), dirs_exist_ok=True)
    return target


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


def serve_test_config(model_repo: Path, feature_repo: Path | None = None,
                      redis_url: str | None = None) -> dict[str, Any]:
    """serve_config.yaml with test-sized overrides; every model deployment kept."""
    config: dict[str, Any] = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app["args"]["model_repository"] = str(model_repo)
    # Placements only for the models this repository holds (build_app refuses others).
    # Placements, and in-ingress model configs, only for the models this repository holds
    # (build_app and the Ingress refuse others, as they would a typo).
    app["args"]["placement"] = {name: place for name, place in app["args"]["placement"].items()
                                if (model_repo / name).is_dir()}
    for dep in app["deployments"]:
        if dep["name"] == "Ingress":
            models = dep["user_config"].get("models", {})
            dep["user_config"]["models"] = {name: config for name, config in models.items()
                                            if (model_repo / name).is_dir()}
    app["args"]["feature_repo"] = str(feature_repo) if feature_repo else None
    if feature_repo is None:
        app["deployments"] = [d for d in app["deployments"] if d["name"] != "FeatureService"]
    if redis_url is not None:
        env_vars = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
        env_vars["KEEL_REDIS_URL"] = redis_url
    for dep in app["deployments"]:
        if dep["name"] == "Ingress":
            # risk_mlp (in the ingress) always goes through the prediction cache, so the
            # cache's behaviour is tested on both placements; the other models keep the
            # shipped "auto" policy.
            dep["user_config"]["cache"]["models"] = {"risk_mlp": "always"}
        dep["ray_actor_options"] = {"num_cpus": 0}
        dep.pop("autoscaling_config", None)
        dep["num_replicas"] = 1
    app["deployments"].append({
        "name": "linear",
        "num_replicas": 1,
        "max_ongoing_requests": 64,
        "ray_actor_options": {"num_cpus": 0},
        "user_config": {"version": "1", "max_batch_size": 16, "batch_wait_timeout_s": 0.005},
    })
    return config


@dataclass
class KeelApp:
    """The running test application and a way to redeploy it with a changed config."""

    base_url: str
    config: dict[str, Any]
    client: Any = field(repr=False)

    @property
    def grpc_target(self) -> str:
        """Where the Open Inference Protocol's gRPC service answers (HAProxy)."""
        return f"127.0.0.1:{self.client.grpc_port}"

    def deployment(self, name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
        deployments = (config or self.config)["applications"][0]["deployments"]
        for dep in deployments:
            if dep["name"] == name:
                return dep  # type: ignore[no-any-return]
        raise KeyError(name)

    def deploy(self, config: dict[str, Any], *, wait: bool = True,
               timeout_s: float = 120) -> None:
        """Apply a config the way `serve deploy` / `serve run` do, and wait for RUNNING."""
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(config)
        self.client.deploy_apps(schema)
        if wait:
            wait_running([a["name"] for a in config["applications"]], timeout_s)
        self.config = config

    def modified(self) -> dict[str, Any]:
        return copy.deepcopy(self.config)

    @contextmanager
    def alongside(self, app: dict[str, Any], timeout_s: float = 180) -> Iterator[str]:
        """Deploy a second application ``app`` next to this one and yield its base URL;
        remove it afterwards."""
        config = self.modified()
        config["applications"].append(app)
        self.deploy(config, wait=False)
        try:
            wait_running([app["name"]], timeout_s)
            yield self.base_url + app["route_prefix"]
        finally:
            config["applications"] = config["applications"][:1]
            self.deploy(config)


def wait_running(app_names: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status()
        apps = {name: status.applications.get(name) for name in app_names}
        # Updated deployments report HEALTHY only once every replica took the change.
        if all(a is not None and a.status == "RUNNING" for a in apps.values()) and all(
            d.status == "HEALTHY" for a in apps.values() if a is not None
            for d in a.deployments.values()
        ):
            return
        failed = [n for n, a in apps.items() if a is not None and a.status == "DEPLOY_FAILED"]
        if failed:
            app = status.applications[failed[0]]
            details = [f"{name}: {d.message}" for name, d in app.deployments.items()
                       if d.status != "HEALTHY"]
            raise RuntimeError(f"deploy failed: {app.message} {details}")
        time.sleep(0.5)
    raise TimeoutError(f"apps {app_names} not RUNNING after {timeout_s} s: {status}")


@pytest.fixture(scope="session")
def serve_client() -> Iterator[Any]:
    """One Ray instance and one Serve instance for the whole test session."""
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start

    port = free_port()
    # The mode `make demo` runs in (see README): Ray reads these when its processes start.
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    # HAProxy's metrics and stats ports are fixed by default (9101, 8404): free ones let
    # a second test session (or a running demo) share the machine.
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))
    metrics_port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, namespace="serve",
             runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}},
             log_to_driver=False, _metrics_export_port=metrics_port)
    grpc_port = free_port()
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
