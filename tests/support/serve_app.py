"""A Keel application on the tests' shared Ray instance: its config, deploys, and what its
replicas report."""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graph.haproxy_nosplice import without_splice

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Ray Serve's throughput-optimised mode with HAProxy on the HTTP port, as `make demo` runs.
SERVE_ENV = without_splice({
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Tests only: do not wait Ray's 30 s for direct-ingress connections to drain.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"})
APP_NAME = "keel"

#: Longer than the ingress's budget in these tests: a request waits that long for its batch.
SLOW_BATCH_S = 1.0


def copy_feature_repo(target: Path) -> Path:
    """configs/feast (definitions and yaml files, not its generated data) into ``target``."""
    shutil.copytree(PROJECT_ROOT / "configs" / "feast", target,
                    ignore=shutil.ignore_patterns("data", "__pycache__"), dirs_exist_ok=True)
    return target


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
        before = {a["name"]: a for a in self.config["applications"]}
        changed_apps = [a["name"] for a in config["applications"]
                        if a["name"] in before and before[a["name"]] != a]
        deployed_at = _deployed_times(changed_apps)
        self.client.deploy_apps(schema)
        if wait:
            # The controller takes a new config asynchronously: until it has, the status
            # still shows the old one RUNNING and HEALTHY.
            _wait_deployed_after(deployed_at, timeout_s=10)
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


def _deployed_times(app_names: list[str]) -> dict[str, float]:
    from ray import serve

    applications = serve.status().applications if app_names else {}
    return {name: applications[name].last_deployed_time_s
            for name in app_names if name in applications}


def _wait_deployed_after(deployed_at: dict[str, float], timeout_s: float) -> None:
    """Until the controller has taken the new config of each app (its deploy time moved)."""
    deadline = time.monotonic() + timeout_s
    while deployed_at and time.monotonic() < deadline:
        now = _deployed_times(list(deployed_at))
        if all(now.get(name, 0.0) > at for name, at in deployed_at.items()):
            return
        time.sleep(0.1)


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


def stats(deployment: str) -> dict[str, Any]:
    """What a running deployment's ``stats()`` method reports."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=APP_NAME)
    return handle.stats.remote().result(timeout_s=30)  # type: ignore[no-any-return]


def served_rows(deployment: str) -> int:
    """Rows (model) or lookups (features) that reached a batch so far."""
    return sum(int(size) * count for size, count in stats(deployment)["batch_sizes"].items())


@contextmanager
def changed(keel_app: KeelApp, **user_configs: dict[str, Any]) -> Iterator[None]:
    """Deploy with some deployments' user_config keys changed; restore afterwards."""
    original = keel_app.modified()
    config = keel_app.modified()
    for name, values in user_configs.items():
        dep = keel_app.deployment(name, config)
        dep["user_config"] = {**dep.get("user_config", {}), **values}
    keel_app.deploy(config)
    try:
        yield
    finally:
        keel_app.deploy(original)
