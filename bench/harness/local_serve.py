"""A Keel application on a private local Ray instance, in the mode ``make demo`` runs
(throughput-optimised Serve, HAProxy without splice): the environment, the deploy and
the wait for RUNNING, for bench scripts that drive one app in-process."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench.harness.network import quiet_port
from bench.harness.report import REPO_ROOT
from graph.haproxy_nosplice import haproxy_env


def serve_environment(temp_dir: Path) -> None:
    """Set what Ray's processes read when they start (before Ray starts), with HAProxy's
    files and ports private to this run."""
    os.environ.update(haproxy_env())  # HAProxy without splice(), as `keel serve` runs it
    os.environ.update({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                       "RAY_SERVE_HAPROXY_METRICS_PORT": str(quiet_port()),
                       "RAY_SERVE_HAPROXY_STATS_PORT": str(quiet_port()),
                       "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(temp_dir / "hap" / "haproxy.cfg"),
                       "RAY_SERVE_HAPROXY_SOCKET_PATH": str(temp_dir / "hap" / "admin.sock")})
    os.environ.pop("RAY_ADDRESS", None)


def start_and_deploy(temp_dir: Path, config: dict[str, Any], port: int,
                     timeout_s: float = 300) -> Any:
    """Start a private Ray instance and Serve on ``port``, deploy ``config`` (a serve
    config document), wait until its first application is RUNNING; returns Serve's
    client. Stop it with ``bench.harness.local_ray.shutdown()``."""
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from bench.harness.local_ray import start_local_ray

    started = time.monotonic()
    start_local_ray(str(temp_dir / "ray"), None, python_path=str(REPO_ROOT),
                    metrics_export_port=quiet_port())
    client = serve_start(http_options={"host": "127.0.0.1", "port": port})
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    name = config["applications"][0]["name"]
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return client
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploy failed: {status.message}")
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"application not RUNNING after {timeout_s} s")
        time.sleep(1)
