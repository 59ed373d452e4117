"""Head / GCS restart under load, with the GCS's state in Redis (GCS fault tolerance).

KubeRay's promise for a RayService with ``gcsFaultToleranceOptions``: Serve keeps
answering while the head's GCS restarts, and the GCS finds the cluster's state again in
Redis. This scenario checks it on one machine:

1. a private ``redis-server`` (its own port and password, never the shared 6379) as the
   GCS's external storage;
2. ``ray start --head`` started the way KubeRay starts the head of
   ``cluster/kuberay/rayservice.yaml``: ``RAY_REDIS_ADDRESS``, ``--redis-password`` (and
   ``REDIS_PASSWORD``), ``RAY_external_storage_namespace``, plus the variables KubeRay
   adds to a RayService's pods (``RAY_gcs_server_request_timeout_seconds=5``,
   ``RAY_SERVE_KV_TIMEOUT_S=5``, ``RAY_timeout_ms_task_wait_for_death_info=0``,
   ``RAY_SERVE_CONTROLLER_PIN_ON_NODE=0``) and Serve's mode as ``make demo`` runs it
   (throughput-optimised, HAProxy); its own temp dir, ports and process group;
3. Keel deployed through the dashboard's REST API (``PUT /api/serve/applications/``, what
   ``serve deploy`` and KubeRay do): serve_config.yaml reduced to the Ingress, the
   SloMonitor and ``risk_gbdt`` (one replica each, no cache: every request crosses a Ray
   hop to the model replica);
4. a paced load (``--rate`` requests per second over ``--clients`` connections) through
   HAProxy; after ``--before-s`` the ``gcs_server`` process is killed (SIGKILL, by
   process id) and, ``--down-s`` later, started again with the command line and
   environment it had (read from ``/proc/<pid>/cmdline`` and ``environ`` before the
   kill). Nothing else restarts it on one machine: without ``ray start --block`` no
   process watches it (with ``--block``, as in a KubeRay head pod, ``ray start`` kills
   the whole head when any of its processes dies, and the pod restarts);
5. what survives: the GCS answering again, the Serve REST API, the applications,
   deployments and replica ids (and the controller's and replicas' process ids) before
   and after, Ray's processes before and after; then a ``serve deploy`` of a changed
   config (``risk_gbdt``: a new ``user_config`` and a second replica, so the restarted
   GCS must schedule a new actor) under the same load.

Writes ``<out>/<date>-gcs-restart.json`` and ``.png`` (answers per second by status,
the kill, the restart and the redeploy marked) and prints a summary::

    .venv/bin/python -m bench.resilience.gcs_restart                  # ~80 s
    .venv/bin/python -m bench.resilience.gcs_restart --down-s 30      # a longer outage

Stops everything it started (Ray's process group, the restarted GCS, Redis) by process
id, never ``ray stop``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.harness.http_load import make_bodies
from bench.harness.network import free_port, free_port_block, quiet_port
from bench.harness.progress import Progress, log
from bench.harness.report import (
    REPO_ROOT,
    RESULTS_DIR,
    environment,
    pyplot,
    save_figure,
    stamped_paths,
    text_table,
)
from bench.harness.servers import process_name
from bench.harness.statistics import percentiles

APP = "keel"
MODEL = "risk_gbdt"
WIDTH = 12
RAY = str(Path(sys.executable).with_name("ray"))
#: What KubeRay adds to every container of a RayService's pods (ray-operator, pod.go).
KUBERAY_RAYSERVICE_ENV = {
    "RAY_timeout_ms_task_wait_for_death_info": "0",
    "RAY_gcs_server_request_timeout_seconds": "5",
    "RAY_SERVE_KV_TIMEOUT_S": "5",
    "RAY_SERVE_CONTROLLER_PIN_ON_NODE": "0",
}
#: Serve's mode as ``make demo`` runs it (tests/support/serve_app.SERVE_ENV).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
             "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


# --------------------------------------------------------------------------- processes


@dataclass
class Started:
    """Everything this run started, stopped in ``stop_all`` by process (group) id."""

    temp_dir: Path
    groups: list[int] = field(default_factory=list)  # process group ids (session leaders)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL,
                                **kwargs)
        self.procs.append(proc)
        self.groups.append(proc.pid)
        return proc

    def stop_all(self) -> list[str]:
        """SIGTERM then SIGKILL each group; then any process whose command line names
        this run's temp dir (Ray's, HAProxy). Returns what had to be killed at the end."""
        for group in reversed(self.groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_group_alive(g) for g in self.groups):
            time.sleep(0.25)
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        # Processes outside those groups (HAProxy, workers) exit when their raylet goes:
        # give them a few seconds, then kill what is left.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and processes_naming(str(self.temp_dir)):
            time.sleep(0.25)
        leftovers = processes_naming(str(self.temp_dir))
        names = [f"{p.pid}:{process_name(p)}" for p in leftovers]
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(leftovers, timeout=10)
        return names


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def processes_naming(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains ``text`` (this run's temp dir)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and text in " ".join(proc.info["cmdline"] or []) \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def ray_processes(temp_dir: Path) -> dict[int, str]:
    """This cluster's processes by id: name, or for Python workers their title."""
    out = {}
    for proc in processes_naming(str(temp_dir)):
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            name = proc.name()
            if name.startswith(("python", "ray::")) or (cmd and "python" in cmd[0]):
                script = next((Path(c).name for c in cmd[1:] if c.endswith(".py")), None)
                name = script or cmd[0]
            out[proc.pid] = name
    return out


# --------------------------------------------------------------------------- cluster


def mask(text: str, *hidden: str) -> str:
    """``text`` without the given secrets (passwords, tokens) in it."""
    for secret in hidden:
        if secret:
            text = text.replace(secret, "***")
    return text


@dataclass
class Cluster:
    temp_dir: Path
    redis_port: int
    redis_password: str
    gcs_port: int
    dashboard_port: int
    http_port: int
    grpc_port: int
    env: dict[str, str]
    flags: list[str]
    #: Ray's token authentication, as the RayService's ``authOptions.mode: token``.
    auth_token: str = ""

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}/api/serve/applications/"


def start_redis(started: Started, port: int, password: str) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    started.popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--requirepass",
                   password, "--save", "", "--appendonly", "no",
                   "--dir", str(started.temp_dir)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("private redis-server", lambda: tcp_open(port), 10)


def tcp_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(what: str, done: Callable[[], bool], timeout_s: float,
             interval_s: float = 0.2) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with contextlib.suppress(Exception):
            if done():
                return time.monotonic() - started
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not within {timeout_s} s")


def cluster_settings(temp_dir: Path, args: argparse.Namespace) -> Cluster:
    password = secrets.token_hex(12)
    redis_port = quiet_port()
    cluster = Cluster(temp_dir=temp_dir, redis_port=redis_port, redis_password=password,
                      gcs_port=quiet_port(), dashboard_port=quiet_port(),
                      http_port=quiet_port(), grpc_port=quiet_port(), env={}, flags=[],
                      auth_token=secrets.token_hex(32))
    hap = temp_dir / "hap"
    hap.mkdir(parents=True, exist_ok=True)
    direct = free_port_block(32000, 39000, 16)
    direct_grpc = free_port_block(42000, 49000, 16)
    cluster.env = {
        # GCS fault tolerance, as KubeRay's gcsFaultToleranceOptions sets it on the head.
        "RAY_REDIS_ADDRESS": f"127.0.0.1:{redis_port}",
        "REDIS_PASSWORD": password,
        "RAY_external_storage_namespace": args.namespace,
        **KUBERAY_RAYSERVICE_ENV,
        # Token authentication, as the RayService's authOptions (KubeRay sets both).
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": cluster.auth_token,
        **SERVE_ENV,
        # Private files and ports, so that nothing else on the machine sees this cluster.
        "RAY_TMPDIR": str(temp_dir),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct + 16),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(direct_grpc),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(direct_grpc + 16),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(hap / "metrics.sock"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        # Keel's modules for every worker (serve_config.yaml's import_path).
        "PYTHONPATH": str(REPO_ROOT),
    }
    if args.reconnect_timeout_s is not None:
        cluster.env["RAY_gcs_rpc_server_reconnect_timeout_s"] = str(args.reconnect_timeout_s)
    cluster.flags = [
        "--head", f"--port={cluster.gcs_port}", f"--redis-password={password}",
        "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir / 'ray'}",
        f"--num-cpus={args.num_cpus}", f"--object-store-memory={256 * 1024 * 1024}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={cluster.dashboard_port}",
        f"--dashboard-agent-listen-port={quiet_port()}",
        f"--dashboard-agent-grpc-port={quiet_port()}",
        f"--runtime-env-agent-port={quiet_port()}",
        f"--metrics-export-port={quiet_port()}",
        f"--ray-client-server-port={quiet_port()}",
        f"--node-manager-port={quiet_port()}", f"--object-manager-port={quiet_port()}",
        "--disable-usage-stats",
    ]
    return cluster


def start_head(started: Started, cluster: Cluster, log_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env.update(cluster.env)
    with log_path.open("ab") as out:
        proc = started.popen([RAY, "start", *cluster.flags], env=env, cwd=REPO_ROOT,
                             stdout=out, stderr=subprocess.STDOUT)
        code = proc.wait(timeout=180)
    if code != 0:
        raise RuntimeError(f"ray start --head exited with {code}; log: {log_path}")


def find_gcs(temp_dir: Path) -> psutil.Process:
    for proc in processes_naming(str(temp_dir)):
        if process_name(proc) == "gcs_server":
            return proc
    raise RuntimeError("no gcs_server process under this run's temp dir")


# --------------------------------------------------------------------------- Serve REST


def rest(method: str, url: str, token: str, body: Any = None,
         timeout: float = 5.0) -> tuple[int, Any]:
    """One call to the dashboard's REST API with the cluster's token."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            text = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000).decode(errors="replace")
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def app_config(cluster: Cluster, repo: Path) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=cluster.http_port)
    config["grpc_options"].update(port=cluster.grpc_port)
    app = config["applications"][0]
    app["args"].update(model_repository=str(repo), models=[MODEL], feature_repo=None,
                       llm=False)
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("Ingress", "SloMonitor", MODEL)]
    for dep in app["deployments"]:
        dep.pop("autoscaling_config", None)
        dep["num_replicas"] = 1
        dep["ray_actor_options"] = {"num_cpus": 0}
        if dep["name"] == "Ingress":
            # Every request crosses a Ray hop to the model's replica: no cached answers.
            dep["user_config"]["cache"]["enabled"] = False
    return config


def redeployed(config: dict[str, Any]) -> dict[str, Any]:
    """The config changed: risk_gbdt gets a new user_config and a second replica."""
    changed = copy.deepcopy(config)
    dep = next(d for d in changed["applications"][0]["deployments"] if d["name"] == MODEL)
    dep["user_config"]["max_batch_size"] = 16
    dep["num_replicas"] = 2
    return changed


def serve_state(cluster: Cluster) -> dict[str, Any] | None:
    """Applications, deployments, replicas (ids, pids, states) and the controller, from
    the REST API; None while it does not answer."""
    try:
        status, details = rest("GET", cluster.api, cluster.auth_token, timeout=5)
    except (OSError, urllib.error.URLError):
        return None
    if status != 200 or not isinstance(details, dict):
        return None
    apps = {}
    for name, app in (details.get("applications") or {}).items():
        deployments = {}
        for dname, dep in app["deployments"].items():
            deployments[dname] = {
                "status": dep["status"],
                "target_num_replicas": dep.get("target_num_replicas"),
                "user_config": (dep.get("deployment_config") or {}).get("user_config"),
                "replicas": sorted(
                    [{"replica_id": r["replica_id"], "state": r["state"], "pid": r.get("pid"),
                      "actor_id": r.get("actor_id")} for r in dep["replicas"]],
                    key=lambda r: r["replica_id"]),
            }
        apps[name] = {"status": app["status"], "deployments": deployments}
    controller = details.get("controller_info") or {}
    return {"applications": apps,
            "controller": {k: controller.get(k) for k in ("actor_id", "worker_id", "node_id")},
            "proxies": {k: {"status": v.get("status"), "actor_id": v.get("actor_id")}
                        for k, v in (details.get("proxies") or {}).items()}}


def running(state: dict[str, Any] | None, replicas: dict[str, int] | None = None) -> bool:
    if not state or APP not in state["applications"]:
        return False
    app = state["applications"][APP]
    if app["status"] != "RUNNING":
        return False
    for name, dep in app["deployments"].items():
        if dep["status"] != "HEALTHY":
            return False
        want = (replicas or {}).get(name)
        if want is not None and sum(r["state"] == "RUNNING" for r in dep["replicas"]) != want:
            return False
    return True


def replica_ids(state: dict[str, Any] | None) -> dict[str, list[str]]:
    if not state or APP not in state["applications"]:
        return {}
    return {name: [r["replica_id"] for r in dep["replicas"]]
            for name, dep in state["applications"][APP]["deployments"].items()}


# --------------------------------------------------------------------------- load


@dataclass
class Answer:
    sent: float
    done: float
    status: str
    retry_after: bool
    detail: str = ""


@dataclass
class Load:
    """Paced load: ``clients`` connections, each sending every ``clients / rate`` seconds
    (or at once after a slow answer: never more than one request in flight each)."""

    url: str
    rate: float
    clients: int
    clock: float = field(default_factory=time.monotonic)
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def now(self) -> float:
        return time.monotonic() - self.clock

    def start(self) -> None:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True,
                                       name="gcs-restart-load")
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=60)

    async def _run(self) -> None:
        import aiohttp

        bodies = make_bodies(width=WIDTH, pool=512, seed=11)
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.clients)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, bodies, k)
                                   for k in range(self.clients)))

    async def _client(self, session: Any, bodies: list[bytes], k: int) -> None:
        import aiohttp

        period = self.clients / self.rate
        next_at = self.now() + period * k / self.clients
        i = k
        while not self.stop.is_set():
            delay = next_at - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at + period, self.now())
            sent = self.now()
            retry_after, detail = False, ""
            try:
                async with session.post(self.url, data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as resp:
                    payload = await resp.read()
                    status = str(resp.status)
                    retry_after = "Retry-After" in resp.headers
                    if resp.status != 200:
                        detail = payload[:300].decode("utf-8", "replace")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status, detail = type(exc).__name__, str(exc)[:300]
            self.answers.append(Answer(sent, self.now(), status, retry_after, detail))
            i += self.clients

    def between(self, start: float, end: float) -> list[Answer]:
        return [a for a in list(self.answers) if start <= a.done < end]


def kind(answer: Answer) -> str:
    if answer.status == "200":
        return "200"
    if answer.status == "503" and answer.retry_after:
        return "503_retry_after"
    return "error"


def summary(load: Load, start: float, end: float) -> dict[str, Any]:
    answers = load.between(start, end)
    kinds = Counter(kind(a) for a in answers)
    samples = sorted({f"{a.status}: {a.detail[:160]}" for a in answers if a.status != "200"})
    latencies = [(a.done - a.sent) * 1000 for a in answers if a.status == "200"]
    return {"seconds": round(end - start, 1), "requests": len(answers),
            "ok": kinds["200"], "503_retry_after": kinds["503_retry_after"],
            "errors": kinds["error"],
            **percentiles(latencies, (50, 99), digits=1),
            "max_ms": round(max(latencies), 1) if latencies else None,
            "statuses": dict(sorted(Counter(a.status for a in answers).items())),
            "samples": samples[:5]}


def longest_gap(load: Load, start: float, end: float) -> float:
    """The longest time without a 200 answer between ``start`` and ``end``."""
    oks = sorted(a.done for a in load.between(start, end) if a.status == "200")
    times = [start, *oks, end]
    return round(max(b - a for a, b in itertools.pairwise(times)), 2)


def timeline(load: Load, end: float, cpu: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """Per second: answers by kind, p50 latency of the 200s, the machine's CPU use."""
    rows = []
    for second in range(int(end) + 1):
        answers = load.between(second, second + 1)
        kinds = Counter(kind(a) for a in answers)
        ok_ms = [(a.done - a.sent) * 1000 for a in answers if a.status == "200"]
        busy = [c for t, c in cpu if second <= t < second + 1]
        rows.append({"t": second, "ok": kinds["200"], "503": kinds["503_retry_after"],
                     "errors": kinds["error"],
                     **percentiles(ok_ms, (50,), digits=1),
                     "cpu_percent": busy[0] if busy else None})
    return rows


class CpuSampler:
    """The machine's CPU use (all cores, percent) once a second, on the load's clock."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        psutil.cpu_percent(interval=None)
        self.thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.samples.append((round(self.load.now(), 2), psutil.cpu_percent(interval=None)))

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by every process on the machine, by ``pid:name``
    (this cluster's processes and anyone else's: the machine is shared)."""
    out = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        with contextlib.suppress(psutil.Error, TypeError):
            times = proc.info["cpu_times"]
            out[f"{proc.pid}:{proc.info['name']}"] = times.user + times.system
    return out


def top_cpu(first: dict[str, float], second: dict[str, float], n: int = 8) -> dict[str, float]:
    """The ``n`` processes that used the most CPU seconds between two snapshots."""
    used = {k: second[k] - first.get(k, 0.0) for k in second}
    return {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1])[:n]}


# --------------------------------------------------------------------------- scenario


def kill_and_restart_gcs(cluster: Cluster, started: Started, load: Load,
                         marks: dict[str, float], down_s: float,
                         result: dict[str, Any]) -> None:
    gcs = find_gcs(cluster.temp_dir)
    argv = gcs.cmdline()
    env = gcs.environ()
    cwd = gcs.cwd()
    hidden = (cluster.redis_password, cluster.auth_token)
    result["gcs"] = {"pid": gcs.pid,
                     "cmdline": [mask(a, *hidden) for a in argv],
                     "ft_env": {k: mask(v, *hidden) for k, v in env.items()
                                if k in ("RAY_REDIS_ADDRESS", "RAY_external_storage_namespace",
                                         "REDIS_PASSWORD", "RAY_AUTH_MODE")
                                or k.startswith("RAY_gcs")}}
    result["processes_before_kill"] = ray_processes(cluster.temp_dir)
    cpu_at_kill = cpu_seconds()
    result["cpu_seconds_before_kill"] = top_cpu(result.pop("_cpu_start"), cpu_at_kill)
    gcs.kill()  # SIGKILL: the head's GCS crashes
    marks["kill"] = load.now()
    log(f"gcs_server {gcs.pid} killed (SIGKILL) at t={marks['kill']:.1f} s")
    gcs.wait(timeout=10)
    deadline = time.monotonic() + down_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
    result["processes_while_down"] = ray_processes(cluster.temp_dir)
    result["cpu_seconds_while_down"] = top_cpu(cpu_at_kill, cpu_seconds())
    with (cluster.temp_dir / "gcs-restarted.out").open("ab") as out:
        proc = started.popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    marks["restart"] = load.now()
    result["gcs"]["restarted_pid"] = proc.pid
    log(f"gcs_server started again as {proc.pid} at t={marks['restart']:.1f} s")


def run(args: argparse.Namespace, result: dict[str, Any], started: Started,
        progress: Progress, loads: list[Load], loads_cpu: list[CpuSampler]) -> None:
    cluster = cluster_settings(started.temp_dir, args)
    result["cluster"] = {
        "redis": f"private redis-server 127.0.0.1:{cluster.redis_port} (requirepass)",
        "env": {k: mask(v, cluster.redis_password, cluster.auth_token)
                for k, v in cluster.env.items()
                if not k.startswith("RAY_SERVE_HAPROXY") and "DIRECT_INGRESS_M" not in k
                and "FALLBACK" not in k},
        "ray_start": "ray start " + mask(" ".join(cluster.flags), cluster.redis_password),
    }
    progress.step("redis + ray start --head")
    start_redis(started, cluster.redis_port, cluster.redis_password)
    began = time.monotonic()
    start_head(started, cluster, started.temp_dir / "ray-start.log")
    wait_for("dashboard", lambda: tcp_open(cluster.dashboard_port), 60)
    result["head_started_s"] = round(time.monotonic() - began, 1)
    log(f"head up in {result['head_started_s']} s (GCS :{cluster.gcs_port}, "
        f"dashboard :{cluster.dashboard_port})")
    progress.advance("head up")

    progress.step("serve deploy (REST)")
    repo = REPO_ROOT / "models"
    config = app_config(cluster, repo)
    status, body = rest("PUT", cluster.api, cluster.auth_token, config, timeout=60)
    if status != 200:
        raise RuntimeError(f"serve deploy answered {status}: {body}")
    wait_for("application RUNNING", lambda: running(serve_state(cluster)), args.deploy_timeout_s,
             0.5)
    url = f"http://127.0.0.1:{cluster.http_port}/v2/models/{MODEL}/infer"
    probe = make_bodies(width=WIDTH, pool=1)[0]

    def answers() -> bool:
        request = urllib.request.Request(url, data=probe,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            return bool(resp.status == 200)

    wait_for("first inference through HAProxy", answers, 60, 0.5)
    result["deployed_s"] = round(time.monotonic() - began, 1)
    log(f"deployed and answering in {result['deployed_s']} s")
    progress.advance("deployed")

    load = Load(url, args.rate, args.clients)
    loads.append(load)
    marks: dict[str, float] = {}
    result["marks_s"] = marks
    load.start()
    marks["load"] = 0.0
    progress.step(f"steady load, {args.before_s:g} s")
    cpu = CpuSampler(load)
    loads_cpu.append(cpu)
    # CPU seconds per process over the last stretch before the kill, as long as the outage.
    time.sleep(max(0.0, args.before_s - args.down_s))
    result["_cpu_start"] = cpu_seconds()
    time.sleep(min(args.down_s, args.before_s))
    result["state_before"] = serve_state(cluster)
    progress.advance("before")

    progress.step(f"GCS killed, restarted after {args.down_s:g} s")
    kill_and_restart_gcs(cluster, started, load, marks, args.down_s, result)
    progress.advance("GCS restarted")

    progress.step("waiting for the GCS and Serve's REST API")
    t0 = time.monotonic()
    try:
        wait_for("GCS port", lambda: tcp_open(cluster.gcs_port), args.recover_timeout_s)
        marks["gcs_listening"] = load.now()
        wait_for("Serve REST API answers, app RUNNING",
                 lambda: running(serve_state(cluster)),
                 max(1.0, args.recover_timeout_s - (time.monotonic() - t0)), 0.5)
        marks["control_plane_back"] = load.now()
        log(f"Serve's REST API answers again, app RUNNING, "
            f"{marks['control_plane_back'] - marks['restart']:.1f} s after the restart")
    except TimeoutError as exc:
        result["recovery_error"] = str(exc)
        log(f"NOT recovered: {exc}")
    time.sleep(args.after_s)
    result["state_after"] = serve_state(cluster)
    result["processes_after"] = ray_processes(cluster.temp_dir)
    progress.advance("recovered" if "recovery_error" not in result else "not recovered")

    progress.step("serve deploy of a changed config")
    marks["redeploy"] = load.now()
    try:
        status, body = rest("PUT", cluster.api, cluster.auth_token, redeployed(config),
                            timeout=60)
        result["redeploy"] = {"status": status, "body": body if status != 200 else None}
        if status == 200:
            wanted = {MODEL: 2}

            def applied() -> bool:
                state = serve_state(cluster)
                return running(state, wanted) and state is not None and state[
                    "applications"][APP]["deployments"][MODEL]["user_config"][
                    "max_batch_size"] == 16

            wait_for("redeploy applied (2 risk_gbdt replicas, max_batch_size 16)", applied,
                     args.deploy_timeout_s, 0.5)
            marks["redeployed"] = load.now()
            result["redeploy"]["seconds"] = round(marks["redeployed"] - marks["redeploy"], 1)
            log(f"redeploy applied in {result['redeploy']['seconds']} s")
    except (TimeoutError, OSError, urllib.error.URLError) as exc:
        result.setdefault("redeploy", {})["error"] = f"{type(exc).__name__}: {exc}"
        log(f"redeploy FAILED: {exc}")
    result["state_final"] = serve_state(cluster)
    time.sleep(3)
    marks["end"] = load.now()
    load.finish()
    progress.advance("redeployed")


def analyse(load: Load, result: dict[str, Any], cpu: list[tuple[float, float]]) -> None:
    """Phases, outage figures, what survived, the timeline (also of a run cut short)."""
    marks = result["marks_s"]
    end = marks["end"]
    kill = marks.get("kill", end)
    restart = marks.get("restart", end)
    after = marks.get("control_plane_back", restart)
    redeploy = marks.get("redeploy", end)
    redeploy_end = marks.get("redeployed", end)
    result["phases"] = {
        "before": summary(load, 0, kill),
        "gcs_down": summary(load, kill, restart),
        "gcs_recovering": summary(load, restart, after),
        "recovered": summary(load, after, redeploy),
        "redeploy": summary(load, redeploy, redeploy_end),
        "total": summary(load, 0, end + 30),
    }
    result["gcs_down_s"] = round(restart - kill, 1)
    if "gcs_listening" in marks:
        result["gcs_listening_after_restart_s"] = round(marks["gcs_listening"]
                                                       - marks["restart"], 2)
    if "control_plane_back" in marks:
        result["control_plane_outage_s"] = round(marks["control_plane_back"] - marks["kill"], 1)
    result["longest_gap_without_200_s"] = longest_gap(load, kill, redeploy_end)
    before = replica_ids(result.get("state_before"))
    after_ids = replica_ids(result.get("state_after"))
    result["state_survived"] = {
        "same_applications": bool(before) and bool(after_ids) and sorted(
            result["state_before"]["applications"]) == sorted(
            result["state_after"]["applications"]),
        "same_replica_ids": bool(before) and before == after_ids,
        "same_controller": bool(before) and bool(after_ids) and result["state_before"][
            "controller"]["actor_id"] == result["state_after"]["controller"]["actor_id"],
    }
    died = sorted(set(result.get("processes_before_kill", {}).values())
                  - set(result.get("processes_after", {}).values()))
    result["processes_gone_after"] = died
    result["timeline"] = timeline(load, end, cpu)
    # Every request around the outage: [sent s, latency ms, status].
    result["answers_around_outage"] = [
        [round(a.sent, 2), round((a.done - a.sent) * 1000, 1), a.status]
        for a in sorted(load.between(kill - 1, after + 2), key=lambda a: a.sent)]


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = result["timeline"]
    t = [r["t"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(t, [r["ok"] for r in rows], width=1.0, align="edge", color="tab:green",
           label="200")
    ax.bar(t, [r["503"] for r in rows], width=1.0, align="edge", color="tab:orange",
           bottom=[r["ok"] for r in rows], label="503 + Retry-After")
    ax.bar(t, [r["errors"] for r in rows], width=1.0, align="edge", color="tab:red",
           bottom=[r["ok"] + r["503"] for r in rows], label="other errors")
    marks = result["marks_s"]
    styles = {"kill": ("GCS killed", "tab:red"), "restart": ("GCS started again", "tab:blue"),
              "control_plane_back": ("REST API + app RUNNING", "tab:purple"),
              "redeploy": ("serve deploy", "black"), "redeployed": ("deploy applied", "gray")}
    for key, (label, color) in styles.items():
        if key in marks:
            ax.axvline(marks[key], color=color, linestyle="--", linewidth=1.2, label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("answers per second")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    latency = ax.twinx()
    latency.plot([x + 0.5 for x in t],
                 [r["p50_ms"] if r["p50_ms"] is not None else float("nan") for r in rows],
                 color="black", linewidth=1, label="p50 latency (200s)")
    latency.set_ylabel("p50 latency, ms")
    latency.set_ylim(bottom=0)
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = latency.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=7, loc="lower left")
    p = result["phases"]["total"]
    save_figure(fig, path, f"GCS killed and restarted ({result['gcs_down_s']} s down), Redis "
                f"GCS FT: {p['ok']} answered, {p['503_retry_after']} 503 + Retry-After, "
                f"{p['errors']} other errors")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rate", type=float, default=40, help="requests per second")
    parser.add_argument("--clients", type=int, default=4, help="connections")
    parser.add_argument("--before-s", type=float, default=15, help="steady load first")
    parser.add_argument("--down-s", type=float, default=10,
                        help="seconds between the kill and the GCS's new start")
    parser.add_argument("--after-s", type=float, default=10,
                        help="load after the control plane is back, before the redeploy")
    parser.add_argument("--recover-timeout-s", type=float, default=120)
    parser.add_argument("--deploy-timeout-s", type=float, default=240)
    parser.add_argument("--num-cpus", type=int, default=2,
                        help="the head's CPUs (on KubeRay the head has 0; here it hosts "
                             "the replicas)")
    parser.add_argument("--reconnect-timeout-s", type=int, default=None,
                        help="RAY_gcs_rpc_server_reconnect_timeout_s (default: Ray's, 60; "
                             "KubeRay sets 600 on workers only)")
    parser.add_argument("--namespace", default="keel",
                        help="RAY_external_storage_namespace (the rendered RayService's)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="directory for the JSON and PNG")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the JSON here instead (no PNG unless --png)")
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--temp-dir", type=Path, default=None,
                        help="a short, empty directory for everything the cluster writes "
                             "(default: a new /tmp/kgr*); removed at the end")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the tails of Ray's logs beside the JSON")
    return parser.parse_args(argv)


def keep_logs(temp_dir: Path, into: Path, lines: int = 200) -> None:
    for pattern in ("ray/session_*/logs/gcs_server*.out", "ray/session_*/logs/gcs_server*.err",
                    "ray/session_*/logs/raylet.out", "ray/session_*/logs/dashboard.log",
                    "ray/session_*/logs/dashboard.err", "ray/session_*/logs/dashboard_*.log",
                    "ray/session_*/logs/monitor.log",
                    "ray/session_*/logs/serve/*.log", "gcs-restarted.out",
                    "ray-start.log"):
        for path in sorted(temp_dir.glob(pattern)):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                into.mkdir(parents=True, exist_ok=True)
                (into / path.name).write_text("\n".join(tail) + "\n")


def terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminate)
    json_path, logs_dir = stamped_paths(args.out, "gcs-restart", daily=True)
    if args.json is not None:
        json_path, logs_dir = args.json, args.json.with_name(args.json.stem + "-logs")
    png_path = args.png or (json_path.with_suffix(".png") if args.json is None else None)
    # Short: Ray puts unix sockets under it (a socket path has at most 107 bytes).
    temp_dir = args.temp_dir or Path(tempfile.mkdtemp(prefix="kgr", dir="/tmp"))
    temp_dir.mkdir(parents=True, exist_ok=True)
    started = Started(temp_dir)
    result: dict[str, Any] = {
        "what": "gcs_server killed (SIGKILL) and started again under load, GCS state in a "
                "private Redis (GCS fault tolerance as KubeRay sets it up)",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(), "ok": False}
    loads: list[Load] = []
    samplers: list[CpuSampler] = []
    began = time.monotonic()
    try:
        with Progress("gcs_restart", 6, unit="phases") as progress:
            run(args, result, started, progress, loads, samplers)
        result["ok"] = True
    except BaseException as exc:  # recorded; everything is stopped below
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {result['error']}")
    finally:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for sampler in samplers:
                sampler.finish()
            for load in loads:
                if not load.stop.is_set():
                    result.setdefault("marks_s", {}).setdefault("end", load.now())
                    load.finish()
            if args.keep_logs or not result["ok"] or "recovery_error" in result:
                keep_logs(temp_dir, logs_dir)
                result["logs"] = str(logs_dir)
            result["killed_at_stop"] = started.stop_all()
            shutil.rmtree(temp_dir, ignore_errors=True)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    result.pop("_cpu_start", None)
    if loads:
        analyse(loads[0], result, samplers[0].samples if samplers else [])
        if png_path is not None:
            plot(result, png_path)
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if "phases" in result:
        rows = [{"phase": k, **{c: v for c, v in p.items() if c not in ("statuses", "samples")}}
                for k, p in result["phases"].items()]
        print(text_table(rows, ["phase", "seconds", "requests", "ok", "503_retry_after",
                                "errors"]))
        for key in ("gcs_down_s", "gcs_listening_after_restart_s", "control_plane_outage_s",
                    "longest_gap_without_200_s", "state_survived", "processes_gone_after",
                    "redeploy"):
            print(f"{key}: {result.get(key)}")
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path and png_path.exists() else ""))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
