"""What the two Ray Serve servers of the benchmark share: an isolated local Ray
instance and a small control channel on stdin.

Isolation matters on a shared machine: ``ray.init()`` without an address joins
the last cluster started with ``ray start`` (``/tmp/ray/ray_current_cluster``),
which may be someone else's. Here every server starts its own instance
(``address="local"``) under its own temp dir and ports, and shutting it down
stops only that instance, never the other Ray instances on the machine (which
``ray stop --force`` would kill).

Control channel: one JSON object per line on stdin.
``{"cmd": "stats", "out": PATH}`` writes the server's stats (``stats_fn``) to
PATH; ``{"cmd": "stop"}``, end of input, SIGINT or SIGTERM shut Serve and Ray
down and exit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import serve


def start_local_ray(temp_dir: str, dashboard_port: int | None,
                    python_path: str | None = None,
                    metrics_export_port: int | None = None) -> None:
    """Start a private local Ray instance (dashboard on ``dashboard_port``, or none).

    ``python_path`` is put on the workers' PYTHONPATH (for modules beside a script);
    ``metrics_export_port`` fixes the port of Ray's Prometheus endpoint (default: one
    Ray picks).
    """
    extra: dict[str, Any] = {}
    if metrics_export_port is not None:
        extra["_metrics_export_port"] = metrics_export_port
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    runtime_env = {"env_vars": {"PYTHONPATH": python_path}} if python_path else None
    ray.init(
        runtime_env=runtime_env,
        address="local",
        namespace="serve",
        _temp_dir=temp_dir,
        include_dashboard=dashboard_port is not None,
        dashboard_port=dashboard_port,
        # Small messages only; do not reserve 30 % of a shared machine's memory.
        object_store_memory=256 * 1024 * 1024,
        log_to_driver=False,
        **extra,
    )


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _write_json(path: str, document: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(document, handle, default=str)
    os.replace(tmp, path)


def serve_until_stopped(stats_fn: Callable[[], Any] | None = None) -> None:
    """Answer control commands until told to stop, then shut Serve and Ray down."""
    signal.signal(signal.SIGTERM, _terminate)
    print("BENCH-SERVER-UP", flush=True)
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                command = json.loads(line)
            except ValueError:
                print(f"bench control: not JSON: {line!r}", flush=True)
                continue
            if command.get("cmd") == "stop":
                break
            if command.get("cmd") == "stats" and command.get("out"):
                try:
                    document = stats_fn() if stats_fn else {"error": "no stats here"}
                except Exception as exc:
                    traceback.print_exc()
                    document = {"error": f"{type(exc).__name__}: {exc}"}
                _write_json(command["out"], document)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()


def shutdown() -> None:
    """``serve shutdown`` then stop this process's Ray instance (only this one)."""
    # A second signal during shutdown must not leave Ray half-stopped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    started = time.monotonic()
    try:
        serve.shutdown()
    except Exception:
        traceback.print_exc()
    try:
        ray.shutdown()
    except Exception:
        traceback.print_exc()
    print(f"BENCH-SERVER-DOWN after {time.monotonic() - started:.1f} s", flush=True)
