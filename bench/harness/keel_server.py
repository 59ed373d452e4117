"""Keel under the benchmark: ``serve run serve_config.yaml`` on a chosen port.

It runs Ray Serve's own ``serve run`` command (non-blocking) on a copy of the
config whose ``http_options`` and ``grpc_options`` ports are changed, inside a
private local Ray instance (see ``local_ray``), then waits for control commands
on stdin. Before starting it prints the ports it serves on, one JSON line::

    BENCH-SERVER-PORTS {"http": 8200, "grpc": 23456}

(``"grpc": null`` when the config names no ``grpc_options.grpc_servicer_functions``:
Serve then runs no gRPC server.) ``--grpc-port`` defaults to a free port. ``stats``
reports the batch sizes each model deployment saw (``OnnxModel.stats()``, summed over
its replicas) and the replica counts.

Ray Serve's environment switches (``RAY_SERVE_THROUGHPUT_OPTIMIZED``,
``RAY_SERVE_ENABLE_HA_PROXY``, the direct-ingress port range, ...) are read
from the environment this process starts with; ``servers.Server`` sets them.

    .venv/bin/python -m bench.harness.keel_server --port 8200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from bench.harness.local_ray import serve_until_stopped, start_local_ray
from bench.harness.network import quiet_port
from bench.harness.report import REPO_ROOT
from graph.config_check import grpc_port


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """Merge ``extra`` into ``into``, recursing into nested mappings."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def write_config(source: Path, host: str, port: int, grpc_port: int, into: Path,
                 model_user_config: dict[str, Any] | None = None,
                 ingress_user_config: dict[str, Any] | None = None,
                 deployment_options: dict[str, dict[str, Any]] | None = None) -> Path:
    """A copy of ``source`` that listens on ``host:port`` (gRPC on ``grpc_port``).

    ``model_user_config`` is merged into every model deployment's user_config
    (e.g. ``{"max_batch_size": 1}`` turns batching off); ``ingress_user_config``
    is merged, recursively, into the Ingress's (e.g. ``{"cache": {"key_prefix": ...}}``);
    ``deployment_options`` is merged into the named deployments' entries (e.g.
    ``{"Ingress": {"num_replicas": 2}}``).
    """
    config = yaml.safe_load(source.read_text())
    config.setdefault("http_options", {}).update(host=host, port=port)
    config.setdefault("grpc_options", {}).update(port=grpc_port)
    if model_user_config:
        for app in config["applications"]:
            for dep in app.get("deployments", []):
                if dep["name"] != "Ingress":
                    dep.setdefault("user_config", {}).update(model_user_config)
    if ingress_user_config:
        for app in config["applications"]:
            for dep in app.get("deployments", []):
                if dep["name"] == "Ingress":
                    _merge(dep.setdefault("user_config", {}), ingress_user_config)
    for name, options in (deployment_options or {}).items():
        for app in config["applications"]:
            for dep in app.get("deployments", []):
                if dep["name"] == name:
                    _merge(dep, options)
    target = into / "serve_config.bench.yaml"
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


_loop: asyncio.AbstractEventLoop | None = None


def model_stats(app_name: str, config_path: Path) -> dict[str, Any]:
    """``collect_model_stats`` on one long-lived event loop (a background thread).

    With ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` handles route in the caller's event
    loop (``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0``), and the shared router stays
    bound to the first loop it saw, so every call must use the same running loop.
    """
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        threading.Thread(target=_loop.run_forever, name="bench-stats", daemon=True).start()
    future = asyncio.run_coroutine_threadsafe(collect_model_stats(app_name, config_path), _loop)
    return future.result(timeout=120)


async def collect_model_stats(app_name: str, config_path: Path,
                              attempts_per_replica: int = 10) -> dict[str, Any]:
    """Batch sizes per model deployment, summed over replicas, and replica counts.

    A handle call reaches one replica, chosen by the router; the benchmark calls
    ``stats`` repeatedly after the load has stopped, when each replica's counters
    are fixed, and keeps the distinct answers until it has one per running replica.
    """
    from ray import serve

    config = yaml.safe_load(config_path.read_text())
    app = next(a for a in config["applications"] if a["name"] == app_name)
    status = serve.status().applications[app_name]
    report: dict[str, Any] = {"replicas": {}, "models": {}}
    for name, deployment in status.deployments.items():
        states = {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()}
        report["replicas"][name] = states
    models = [d["name"] for d in app.get("deployments", []) if d["name"] != "Ingress"]
    for name in models:
        running = report["replicas"].get(name, {}).get("RUNNING", 1)
        handle = serve.get_deployment_handle(name, app_name=app_name)
        answers: dict[str, dict[str, Any]] = {}
        try:
            for _ in range(max(1, running) * attempts_per_replica):
                answer = await asyncio.wait_for(handle.stats.remote(), 30)
                answers[json.dumps(answer["batch_sizes"], sort_keys=True)] = answer
                if len(answers) >= running:
                    break
        except Exception as exc:
            # A deployment without stats() (e.g. the SloMonitor) must not cost the
            # models' figures.
            report["models"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        total: Counter[int] = Counter()
        for answer in answers.values():
            total.update({int(k): v for k, v in answer["batch_sizes"].items()})
        report["models"][name] = {
            "batch_sizes": {str(k): total[k] for k in sorted(total)},
            "replicas_running": running,
            "replicas_found": len(answers),
            "per_replica": [a["batch_sizes"] for a in answers.values()],
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Keel (serve run serve_config.yaml) for bench")
    parser.add_argument("--config", default=str(REPO_ROOT / "serve_config.yaml"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="port of Serve's gRPC server (grpc_options.port; with HAProxy "
                             "on, HAProxy's gRPC frontend); default: a free port")
    parser.add_argument("--temp-dir", default=None, help="Ray temp dir (default: a new one)")
    parser.add_argument("--dashboard-port", type=int, default=None,
                        help="start Ray's dashboard on this port (as `serve run` does)")
    parser.add_argument("--metrics-export-port", type=int, default=None,
                        help="port of Ray's Prometheus metrics endpoint (default: Ray's choice)")
    parser.add_argument("--app-name", default="keel")
    parser.add_argument("--model-user-config", type=json.loads, default=None,
                        help='JSON merged into every model\'s user_config, e.g. '
                             '\'{"max_batch_size": 1}\'')
    parser.add_argument("--ingress-user-config", type=json.loads, default=None,
                        help='JSON merged into the Ingress\'s user_config, e.g. '
                             '\'{"cache": {"key_prefix": "keelbench:keel:"}}\'')
    parser.add_argument("--deployment-options", type=json.loads, default=None,
                        help='JSON merged into deployments by name, e.g. '
                             '\'{"Ingress": {"num_replicas": 2}}\'')
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="shorthand for --model-user-config '{\"max_batch_size\": N}'")
    args = parser.parse_args(argv)
    if args.max_batch_size is not None:
        args.model_user_config = {**(args.model_user_config or {}),
                                  "max_batch_size": args.max_batch_size}

    if args.grpc_port is None:
        args.grpc_port = quiet_port()
    temp_dir = Path(args.temp_dir or tempfile.mkdtemp(prefix="kb-"))
    config_path = write_config(Path(args.config), args.host, args.port, args.grpc_port,
                               temp_dir, args.model_user_config, args.ingress_user_config,
                               args.deployment_options)
    with_grpc = grpc_port(yaml.safe_load(config_path.read_text())) is not None
    print("BENCH-SERVER-PORTS " + json.dumps(
        {"http": args.port, "grpc": args.grpc_port if with_grpc else None}), flush=True)
    start_local_ray(str(temp_dir / "ray"), args.dashboard_port,
                    metrics_export_port=args.metrics_export_port)

    # Ray is initialised, so `serve run` deploys onto this private instance.
    from ray.serve.scripts import run as serve_run

    serve_run.main(args=[str(config_path), "--non-blocking", "--app-dir", str(REPO_ROOT)],
                   prog_name="serve run", standalone_mode=False)
    serve_until_stopped(lambda: model_stats(args.app_name, config_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
