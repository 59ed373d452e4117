"""`keel serve` (what `make demo` runs): one Ctrl-C ends every process it started, Ray
Serve's HAProxy included, within seconds; proven from the process table. It runs its own
local Ray instance (private temp dir and ports) beside the test session's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.support.redisserver import quiet_port
from tests.support.serve_app import PROJECT_ROOT, SERVE_ENV, serve_test_config

pytestmark = pytest.mark.slow


def test_one_ctrl_c_ends_every_process_keel_serve_started(model_repo: Path) -> None:
    config = serve_test_config(model_repo)
    http_port, grpc_port = quiet_port(), quiet_port()
    config["http_options"].update(host="127.0.0.1", port=http_port)
    config["grpc_options"]["port"] = grpc_port
    app = config["applications"][0]
    app["args"].update(models=["linear"], llm=False, placement={})
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("Ingress", "linear")]
    next(d for d in app["deployments"] if d["name"] == "Ingress")["user_config"]["models"] = {}
    app["args"]["feature_repo"] = None
    temp = Path(tempfile.mkdtemp(prefix="kst", dir="/tmp"))  # short: Ray's socket paths
    path = temp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    hap = temp / "hap"
    env = {**os.environ, **SERVE_ENV,
           "RAY_ADDRESS": "local",  # a new local instance, never the test session's
           "RAY_TMPDIR": str(temp / "ray"),
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(quiet_port()),
           "RAY_SERVE_HAPROXY_STATS_PORT": str(quiet_port()),
           "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
           "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
           "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap),
           "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap / "server-state"),
           "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(hap / "metrics.sock"),
           "PYTHONPATH": str(PROJECT_ROOT)}
    keel = subprocess.Popen([sys.executable, "-m", "graph.cli", "serve", str(path)],
                            cwd=PROJECT_ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready",
                             timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert keel.poll() is None, "keel serve exited before it was ready"
            time.sleep(1)
        else:
            pytest.fail("keel serve was not ready in 240 s")
        started = psutil.Process(keel.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started if p.is_running())
        assert "haproxy" in names and "raylet" in names, names  # what used to outlive it

        keel.send_signal(signal.SIGINT)  # what one Ctrl-C sends
        stopped_at = time.monotonic()
        keel.wait(timeout=60)
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
        assert time.monotonic() - stopped_at < 40
    finally:
        for proc in [*started, psutil.Process(keel.pid)] if keel.poll() is None else started:
            if proc.is_running():
                proc.kill()
        shutil.rmtree(temp, ignore_errors=True)
