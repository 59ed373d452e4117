"""Keel on a two-node Ray cluster on this machine: replicas on both nodes, node loss.

Run as its own process (a pytest process may call ``ray.init`` only once, and its
session already has a Ray instance)::

    .venv/bin/python -m tests.support.cluster_driver --temp-dir /tmp/kmnXXXX --out result.json

What it does, in order:

1. starts a head node (resource ``keel_head``) and a worker node with
   ``ray.cluster_utils.Cluster``, each with one ``keel_slot``, all state under
   ``--temp-dir`` (Ray's sessions, the address file, HAProxy's files) and every port
   its own, so that nothing else on the machine sees or joins this cluster;
2. starts Serve with the HTTP entry (HAProxy) on the head only and deploys Keel with
   the Ingress pinned to the head and the ``linear`` model at two replicas, each
   needing a ``keel_slot``, so one lands on each node; checks that from the
   replicas' node ids;
3. drives steady load, kills the worker node without warning (its raylet and
   every process on it get SIGKILL), and keeps the load on while Ray notices and
   Serve routes around the lost replica;
4. adds a fresh worker node, waits for the model to be back at two replicas, one on
   the new node, and for answers to keep coming;
5. writes what happened as JSON to ``--out`` and shuts its cluster down.

Node death: the GCS declares a node dead after ``health_check_failure_threshold``
missed health checks ``health_check_period_ms`` apart (Ray's defaults: 5 checks 3 s
apart, so 15 s or more); this cluster uses 3 checks 0.5 s apart, so a lost node is
declared dead in 1-2 s, and Serve stops counting its replicas soon after. Requests
the Ingress sends to a replica that just died fail with an actor error, which Keel
answers as 503 with Retry-After; the load client may retry those once, and the
result counts failures before and after that retry.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, cast

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT))

#: GCS health checks of raylets (see the module docstring).
HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
APP = "keel"
WIDTH = 4


def quiet_port() -> int:
    """A free port below the ephemeral range (and below Serve's direct-ingress ports,
    30000 and up): ports that Ray's own processes take by binding port 0 come from the
    ephemeral range, so one picked here cannot be taken between picking and binding."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


def log(message: str) -> None:
    print(f"[cluster-driver {time.strftime('%H:%M:%S')}] {message}", flush=True)


def isolate(temp_dir: Path, ports: dict[str, int]) -> None:
    """Environment for this process and every Ray process it starts.

    RAY_TMPDIR keeps the cluster's address file (``ray_current_cluster``) out of
    /tmp/ray, where a ``ray.init()`` elsewhere on the machine would find it and join.
    """
    from tests.support.serve_app import SERVE_ENV

    hap = temp_dir / "hap"
    os.environ.update(SERVE_ENV)
    os.environ.update({
        "RAY_TMPDIR": str(temp_dir),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(ports["haproxy_metrics"]),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(ports["haproxy_stats"]),
        # HAProxy's files (per node id below these) inside this run's directory.
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(hap / "metrics.sock"),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p),
    })
    os.environ.pop("RAY_ADDRESS", None)


def node_args(resources: dict[str, float], head: bool) -> dict[str, Any]:
    args: dict[str, Any] = {
        "num_cpus": 2,
        "resources": resources,
        "object_store_memory": 100 * 1024 * 1024,
        "metrics_export_port": quiet_port(),
        "dashboard_agent_listen_port": quiet_port(),
        "runtime_env_agent_port": quiet_port(),
    }
    if head:
        # The dashboard process starts even when not "included"; not on 8265 then.
        args.update(include_dashboard=False, dashboard_port=quiet_port(),
                    _system_config=HEALTH_CHECKS)
    return args


def app_config(model_repo: Path) -> dict[str, Any]:
    """The test configuration of serve_config.yaml, placed on the two nodes."""
    from tests.support.serve_app import serve_test_config

    config = serve_test_config(model_repo)
    app = config["applications"][0]
    app["args"].update(models=["linear"], llm=False)
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("Ingress", "SloMonitor", "linear")]
    for dep in app["deployments"]:
        if dep["name"] == "linear":
            dep["num_replicas"] = 2
            dep["ray_actor_options"] = {"num_cpus": 0, "resources": {"keel_slot": 1}}
        else:
            dep["ray_actor_options"] = {"num_cpus": 0, "resources": {"keel_head": 0.01}}
        if dep["name"] == "Ingress":
            # Every request must reach a model replica: no answer from the cache.
            dep["user_config"]["cache"] = {**dep["user_config"]["cache"], "enabled": False}
    return config


def linear_placement(client: Any) -> list[dict[str, Any]]:
    """The ``linear`` replicas: state and node id of each (from the controller)."""
    details = client.get_serve_details()["applications"][APP]["deployments"]["linear"]
    return [{"state": r["state"], "node_id": r.get("node_id"), "replica_id": r["replica_id"]}
            for r in details["replicas"]]


def rows_by_node(client: Any, names: dict[str, str]) -> dict[str, int]:
    """Rows each ``linear`` replica has answered so far, by node name (``names``: node id
    to name), from the replicas' own counters (``OnnxModel.stats()``)."""
    from ray import serve

    details = client.get_serve_details()["applications"][APP]["deployments"]["linear"]
    node_of_pid = {r.get("pid"): names.get(r.get("node_id", ""), "other")
                   for r in details["replicas"]}
    handle = serve.get_deployment_handle("linear", app_name=APP)
    # Throughput-optimised mode routes a handle's calls in the caller's event loop; this
    # plain thread has none, so this handle gets its own (once: handles are cached).
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    seen: dict[int, int] = {}
    for _ in range(16):  # the router spreads these over the replicas
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["pid"]] = sum(int(size) * n for size, n in stats["batch_sizes"].items())
    return {node_of_pid.get(pid, f"pid {pid}"): rows for pid, rows in seen.items()}


def wait_for(what: str, done: Any, timeout_s: float, interval_s: float = 0.25) -> float:
    """Poll ``done()`` until true; the seconds it took. TimeoutError names ``what``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if done():
            return time.monotonic() - started
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not within {timeout_s} s")


def node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def summarise(load: Any, start: float, end: float) -> dict[str, Any]:
    answers = load.between(start, end)
    first = [a for a in answers if not a.retried]
    retries = [a for a in answers if a.retried]
    raw_failed = [a for a in first if not a.ok]
    return {
        "seconds": round(min(end, load.now()) - start, 2),
        "requests": len(first),
        "ok": sum(a.ok for a in first),
        "failed_raw": len(raw_failed),
        "retried": len(retries),
        "failed_after_retry": sum(not a.ok for a in retries)
        + sum(a.status not in (503, 0) for a in raw_failed),
        "failure_statuses": sorted({a.status for a in raw_failed}),
        "failure_samples": sorted({str(a.body)[:160] for a in raw_failed})[:3],
    }


def run(temp_dir: Path, result: dict[str, Any]) -> None:
    ports = {"http": quiet_port(), "haproxy_metrics": quiet_port(),
             "haproxy_stats": quiet_port()}
    isolate(temp_dir, ports)

    import httpx
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from tests.support.modelkit import reference_probabilities, write_linear_model
    from tests.support.serve_app import wait_running
    from tests.support.steadyload import SteadyLoad

    started = time.monotonic()
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args=node_args({"keel_head": 1, "keel_slot": 1}, head=True))
    result["cluster"] = cluster  # for the cleanup in main(); removed before writing
    head_id: str = cast(Any, cluster.head_node).node_id  # typed None until a node exists
    ray.init(address=cluster.address, namespace="serve", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}})
    worker = cluster.add_node(**node_args({"keel_worker": 1, "keel_slot": 1}, head=False))
    cluster.wait_for_nodes()
    log(f"cluster up in {time.monotonic() - started:.1f} s: head {head_id[:8]}, "
        f"worker {worker.node_id[:8]}")

    client = serve_start(http_options={"host": "127.0.0.1", "port": ports["http"]},
                         proxy_location="HeadOnly")
    repo = temp_dir / "models"
    write_linear_model(repo, "linear", "1", n_features=WIDTH, seed=1)
    config = app_config(repo)
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    wait_running([APP], 240)
    base_url = f"http://127.0.0.1:{ports['http']}"
    wait_for("ready", lambda: httpx.get(f"{base_url}/v2/health/ready",
                                        timeout=10).status_code == 200, 60)
    placement = linear_placement(client)
    result["placement_before"] = [
        {**p, "node": "head" if p["node_id"] == head_id else
         "worker" if p["node_id"] == worker.node_id else "other"} for p in placement]
    result["deployed_s"] = round(time.monotonic() - started, 1)
    log(f"deployed in {result['deployed_s']} s; linear replicas on "
        f"{[p['node'] for p in result['placement_before']]}")

    x = np.random.default_rng(4).normal(size=(32, WIDTH)).astype(np.float32)
    expected = reference_probabilities(x, seed=1)

    def infer(client: httpx.Client, i: int) -> httpx.Response:
        row = i % len(x)
        return client.post("/v2/models/linear/infer", json={
            "id": str(row), "inputs": [{"name": "features", "shape": [1, WIDTH],
                                        "datatype": "FP32", "data": x[row].tolist()}]})

    load = SteadyLoad(base_url, retry_once=True, timeout_s=30)
    load.start("infer", infer, clients=4)
    marks: dict[str, float] = {"load": load.now()}
    try:
        time.sleep(4)
        result["rows_by_node_before_kill"] = rows_by_node(
            client, {head_id: "head", worker.node_id: "worker"})
        marks["kill"] = load.now()
        dead_id = worker.node_id
        cluster.remove_node(worker, allow_graceful=False)
        log("worker node killed")
        result["node_dead_detected_s"] = round(wait_for(
            "node marked dead", lambda: not node_alive(dead_id), 60, 0.1), 2)
        marks["dead"] = load.now()
        log(f"GCS marked it dead after {result['node_dead_detected_s']} s")
        result["replica_gone_s"] = round(wait_for(
            "lost replica noticed by Serve", lambda: all(
                p["node_id"] != dead_id or p["state"] != "RUNNING"
                for p in linear_placement(client)), 60) + marks["dead"] - marks["kill"], 2)
        time.sleep(6)  # serving on the head's replica alone
        marks["add"] = load.now()
        replacement = cluster.add_node(**node_args({"keel_worker": 1, "keel_slot": 1},
                                                   head=False))
        cluster.wait_for_nodes()
        log(f"new worker node {replacement.node_id[:8]} added")

        def back_to_full() -> bool:
            running = [p for p in linear_placement(client) if p["state"] == "RUNNING"]
            return len(running) == 2 and {p["node_id"] for p in running} == {
                head_id, replacement.node_id}

        result["recovered_s"] = round(wait_for("two replicas again", back_to_full, 180), 1)
        wait_running([APP], 120)
        marks["recovered"] = load.now()
        log(f"two replicas again {result['recovered_s']} s after the node was added")
        time.sleep(4)
        result["rows_by_node_at_end"] = rows_by_node(
            client, {head_id: "head", replacement.node_id: "new_worker"})
        marks["end"] = load.now()
    finally:
        load.stop()

    placement = linear_placement(client)
    result["placement_after"] = [
        {**p, "node": "head" if p["node_id"] == head_id else
         "new_worker" if p["node_id"] == replacement.node_id else "other"}
        for p in placement]
    result["marks_s"] = {k: round(v, 2) for k, v in marks.items()}
    result["phases"] = {
        "before_kill": summarise(load, marks["load"], marks["kill"]),
        "kill_to_dead": summarise(load, marks["kill"], marks["dead"]),
        "one_node": summarise(load, marks["dead"], marks["add"]),
        "node_added": summarise(load, marks["add"], marks["recovered"]),
        "recovered": summarise(load, marks["recovered"], marks["end"]),
        "total": summarise(load, 0, marks["end"] + 60),
    }
    wrong = 0
    for answer in load.answers:
        if answer.ok:
            out = next(o for o in answer.body["outputs"] if o["name"] == "probabilities")
            if not np.allclose(out["data"], expected[int(answer.body["id"])], atol=1e-5):
                wrong += 1
    result["wrong_answers"] = wrong
    result["ok"] = True


def shutdown(result: dict[str, Any]) -> None:
    """Serve, the driver's connection, then every node of the cluster (only this one)."""
    import ray
    from ray import serve

    cluster = result.pop("cluster", None)
    if ray.is_initialized():
        try:
            serve.shutdown()
        except Exception:
            traceback.print_exc()
        ray.shutdown()
    if cluster is not None:
        cluster.shutdown()


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--temp-dir", type=Path, required=True,
                        help="a short, empty directory for everything this run writes")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    args = parser.parse_args(argv)
    # SIGTERM (the test's timeout) unwinds through the cleanup below like Ctrl-C.
    signal.signal(signal.SIGTERM, _terminate)
    result: dict[str, Any] = {"ok": False}
    started = time.monotonic()
    try:
        run(args.temp_dir, result)
    except BaseException as exc:  # reported in the result (and the exit status)
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        try:
            shutdown(result)
        except Exception:
            traceback.print_exc()
        result.pop("cluster", None)
        result["wall_s"] = round(time.monotonic() - started, 1)
        args.out.write_text(json.dumps(result, indent=2, default=str))
        log(f"result written to {args.out} ({'ok' if result['ok'] else 'FAILED'})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
