"""The servers under test: what one is (``Target``), and its process tree
(``Server``): started in its own session as ``python -m bench.harness.<module>`` from the
repository root, ready once ``GET /v2/health/ready`` answers 200 and one inference
succeeds, stopped with everything it started (``serving`` does all three around a
scenario's points and records them in the run's JSON).

Every server starts from an environment without the ``RAY_SERVE_*`` switches and
``RAY_ADDRESS`` and gets only its target's own, so a target means the same thing in
every shell; Ray targets get private ports and files, so parallel Ray instances on the
machine (tests) never collide with them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from bench.harness.network import (
    free_port,
    free_port_block,
    http_get,
    http_post,
    port_free,
    quiet_port,
)
from bench.harness.progress import log
from bench.harness.report import REPO_ROOT, rel
from graph.haproxy_nosplice import without_splice

PYTHON = sys.executable

#: Switches that change how Ray Serve moves requests; every target starts without
#: them and adds only its own, so a target means the same thing in every shell.
STRIPPED_ENV_PREFIXES = ("RAY_SERVE_",)
STRIPPED_ENV = ("RAY_ADDRESS",)


def module_argv(module: str, *args: str) -> list[str]:
    """``python -m bench.harness.<module> ARGS`` (run with the repository root as cwd)."""
    return [PYTHON, "-m", f"bench.harness.{module}", *args]



@dataclass(frozen=True)
class Target:
    """One server configuration under test."""

    name: str
    kind: str  # "keel", "baseline" or "naive"
    description: str
    env: dict[str, str] = field(default_factory=dict)
    #: Send the load to the ingress replica's own port (direct ingress) instead of
    #: the HTTP port in ``http_options`` (the proxy, or HAProxy).
    direct_port: bool = False
    #: Keel only: merged into every model's user_config (e.g. max_batch_size 1: no batching).
    model_user_config: dict[str, Any] = field(default_factory=dict)
    #: Keel only: merged into deployments by name (e.g. {"Ingress": {"num_replicas": 1}}).
    deployment_options: dict[str, dict[str, Any]] = field(default_factory=dict)


TP = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
#: With RAY_SERVE_THROUGHPUT_OPTIMIZED=1 a replica keeps its log records in memory until
#: it has 1,000 (or an ERROR), and a replica stopped with the server loses them: its log
#: file stays empty. 1 writes each record at once (for benchmarks that read the logs).
UNBUFFERED_LOGS = {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}
#: Throughput-optimised with HAProxy: the mode `make demo` runs.
HA = {**TP, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
#: Ray Serve's default request router (what Keel's StallAwareRouter extends).
SERVE_ROUTER = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"
TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("keel", "keel",
           "serve_config.yaml, Ray Serve defaults (Python proxy on the HTTP port)"),
    Target("keel_tp", "keel",
           "serve_config.yaml, RAY_SERVE_THROUGHPUT_OPTIMIZED=1, load to the proxy's HTTP port",
           env=TP),
    Target("keel_tp_direct", "keel",
           "serve_config.yaml, RAY_SERVE_THROUGHPUT_OPTIMIZED=1, load to the ingress "
           "replica's direct-ingress port", env=TP, direct_port=True),
    Target("keel_haproxy", "keel",
           "serve_config.yaml, RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1, "
           "load to the HTTP port (HAProxy)", env=HA),
    Target("keel_haproxy_nobatch", "keel",
           "keel_haproxy with max_batch_size 1 for every model: the batching gain's baseline",
           env=HA,
           model_user_config={"max_batch_size": 1}),
    Target("keel_haproxy_wait0", "keel",
           "keel_haproxy with batch_wait_timeout_s 0: batches only what queued meanwhile",
           env=HA,
           model_user_config={"batch_wait_timeout_s": 0.0}),
    Target("keel_haproxy_serve_router", "keel",
           "keel_haproxy with Ray Serve's own router on the model and feature deployments "
           "instead of Keel's stall-aware one: that router's cost",
           env=HA,
           deployment_options={name: {"request_router_config": {
               "request_router_class": SERVE_ROUTER}} for name in (
               "risk_gbdt", "FeatureService")}),
    Target("baseline_fastapi", "baseline",
           "one uvicorn process, FastAPI, one ONNX Runtime session, no batching"),
    Target("naive_serve", "naive",
           "one @serve.deployment with @serve.ingress(FastAPI), Ray defaults, no batching"),
]}


def unbuffered_logs(target: Target) -> Target:
    """``target`` with replica logs written at once (``UNBUFFERED_LOGS``)."""
    return dataclasses.replace(target, env={**target.env, **UNBUFFERED_LOGS},
                               description=target.description + "; " + " ".join(
                                   f"{k}={v}" for k, v in UNBUFFERED_LOGS.items()))


class ServerFailed(RuntimeError):
    """The server did not come up, or stopped answering."""


class Server:
    """One target's server process (and, for Ray targets, its private Ray instance)."""

    def __init__(self, target: Target, args: argparse.Namespace, log_path: Path) -> None:
        self.target = target
        self.args = args
        self.log_path = log_path
        self.temp_dir = Path(tempfile.mkdtemp(prefix="kb-"))  # short: Ray's socket paths
        self.port = quiet_port()
        self.load_port = self.port
        #: Where Keel's gRPC server (grpc_options.port) listens, if its config has one.
        self.grpc_port = self.port
        while self.grpc_port == self.port:
            self.grpc_port = quiet_port()
        self.direct_port: int | None = None
        self.direct_base = 0
        #: Ray's dashboard (and its REST API: ``serve deploy``), when started with one.
        self.dashboard_port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._known: dict[int, psutil.Process] = {}
        self.uses_ray = target.kind in ("keel", "naive")
        #: Something went wrong (an error answer, a failed step): keep Ray's logs.
        self.failed = False

    # ---- start

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(STRIPPED_ENV_PREFIXES) and k not in STRIPPED_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        if self.uses_ray:
            # Private ports and files, so parallel Ray instances on the machine (tests)
            # never collide with this one.
            self.direct_base = free_port_block(32000, 39000, 16)
            grpc_base = free_port_block(42000, 49000, 16)
            env.update({
                "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(self.direct_base),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(self.direct_base + 16),
                "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_base),
                "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_base + 16),
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(self.temp_dir / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(self.temp_dir / "haproxy-admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(self.temp_dir),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(self.temp_dir / "server-state"),
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(self.temp_dir / "haproxy-m.sock"),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                # Serve's fallback proxy (8500/9500 by default): HAProxy sends requests there
                # while no replica is up, so a shared default would reach ANOTHER instance.
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
                "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
            })
        env.update(self.target.env)
        return without_splice(env)  # Keel as shipped: HAProxy without splice()

    def _argv(self) -> list[str]:
        a = self.args
        common = ["--host", "127.0.0.1", "--port", str(self.port)]
        ray_common = ["--temp-dir", str(self.temp_dir)]
        if a.dashboard:
            self.dashboard_port = free_port()
            ray_common += ["--dashboard-port", str(self.dashboard_port)]
        if self.target.kind == "keel":
            extra = (["--model-user-config", json.dumps(self.target.model_user_config)]
                     if self.target.model_user_config else [])
            if self.target.deployment_options:
                extra += ["--deployment-options", json.dumps(self.target.deployment_options)]
            return module_argv("keel_server", "--config", str(a.config),
                               "--grpc-port", str(self.grpc_port), *common, *ray_common, *extra)
        if self.target.kind == "naive":
            return module_argv("naive_serve", "--model", a.model,
                               "--repository", str(a.repository), *common, *ray_common)
        return module_argv("baseline_fastapi", "--model", a.model,
                           "--repository", str(a.repository), *common)

    def start(self) -> None:
        env = self._env()
        argv = self._argv()
        self._log = self.log_path.open("ab")
        self._log.write(f"$ {' '.join(argv)}\n".encode())
        self._log.write("".join(f"  {k}={v}\n" for k, v in sorted(env.items())
                                if k.startswith("RAY_")).encode())
        self._log.flush()
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def _remember_processes(self) -> None:
        """Note every descendant, so that none outlives ``stop`` (Ray spawns many)."""
        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                self._known.setdefault(proc.pid, proc)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerFailed(f"{self.target.name} exited with {self.proc.returncode} "
                               f"before it was ready; log: {self.log_path}")

    def wait_ready(self, timeout_s: float, probe: bytes) -> dict[str, Any]:
        """Wait for readiness (200) and one good inference; find the direct port."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.port}/v2/health/ready"
        last = "no answer"
        while True:
            self._check_alive()
            self._remember_processes()
            try:
                status, text = http_get(url)
                if status == 200:
                    break
                last = f"{status} {text[:300]}"
            except (OSError, urllib.error.URLError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.target.name}: {url} not ready after {timeout_s} s "
                                   f"(last: {last})")
            time.sleep(0.5)
        if self.uses_ray:
            self.direct_port = self._find_direct_port(deadline)
        if self.target.direct_port:
            if self.direct_port is None:
                raise ServerFailed(f"{self.target.name}: no ingress replica answers on the "
                                   f"direct-ingress ports {self.direct_base}..+16")
            self.load_port = self.direct_port
        infer_url = self.infer_url()
        while True:
            self._check_alive()
            status, text = http_post(infer_url, probe)
            if status == 200:
                break
            # 404/5xx: routes or replicas still coming up; anything else will not change.
            if (status != 404 and status < 500) or time.monotonic() > deadline:
                raise ServerFailed(f"{self.target.name}: probe inference answered {status}: "
                                   f"{text[:1000]}")
            time.sleep(0.5)
        self._remember_processes()
        return {"probe_status": status, "probe_answer": json.loads(text)}

    def _find_direct_port(self, deadline: float) -> int | None:
        """The ingress replica's own HTTP port when direct ingress is on (else None)."""
        wanted = "RAY_SERVE_THROUGHPUT_OPTIMIZED" in self.target.env \
            or "RAY_SERVE_ENABLE_HA_PROXY" in self.target.env
        if not wanted:
            return None
        while True:
            for port in range(self.direct_base, self.direct_base + 16):
                with contextlib.suppress(OSError, urllib.error.URLError):
                    status, _ = http_get(f"http://127.0.0.1:{port}/v2/health/ready", 2.0)
                    if status == 200:
                        return port
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)

    def infer_url(self) -> str:
        return f"http://127.0.0.1:{self.load_port}/v2/models/{self.args.model}/infer"

    # ---- stats

    def stats(self, timeout_s: float = 60.0) -> dict[str, Any] | None:
        """Keel's batch sizes and replica counts, via the server's control channel."""
        if self.target.kind != "keel" or self.proc is None or self.proc.stdin is None:
            return None
        out = self.temp_dir / f"stats-{time.monotonic_ns()}.json"
        command = json.dumps({"cmd": "stats", "out": str(out)}) + "\n"
        try:
            self.proc.stdin.write(command.encode())
            self.proc.stdin.flush()
        except OSError as exc:
            return {"error": f"control channel: {exc}"}
        deadline = time.monotonic() + timeout_s
        while not out.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return {"error": "no stats answer"}
            time.sleep(0.1)
        document: dict[str, Any] = json.loads(out.read_text())
        return document

    # ---- stop

    def _wait(self, seconds: float) -> bool:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _signal_group(self, signum: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def stop(self) -> dict[str, Any]:
        """Stop the server and everything it started; escalate until all are gone."""
        report: dict[str, Any] = {"steps": []}
        started = time.monotonic()
        if self.proc is None:
            return report
        self._remember_processes()
        # Which processes served (e.g. whether an haproxy process was really there).
        report["processes_seen"] = dict(Counter(process_name(p) for p in self._known.values()))
        if self.proc.poll() is None:
            if self.uses_ray and self.proc.stdin is not None:
                # The graceful path: serve.shutdown() and ray.shutdown() in the driver.
                with contextlib.suppress(OSError):
                    self.proc.stdin.write(b'{"cmd": "stop"}\n')
                    self.proc.stdin.flush()
                    self.proc.stdin.close()
                report["steps"].append("stop command")
                done = self._wait(60)
            else:
                self.proc.send_signal(signal.SIGTERM)
                report["steps"].append("SIGTERM")
                done = self._wait(15)
            # `serve run` may ignore the first SIGINT for > 15 s (DESIGN.md): escalate.
            for signum, grace in ((signal.SIGINT, 15), (signal.SIGTERM, 10),
                                  (signal.SIGKILL, 5)):
                if done:
                    break
                report["steps"].append(signal.Signals(signum).name)
                self._signal_group(signum)
                done = self._wait(grace)
        report["exit_code"] = self.proc.returncode
        # Whatever is left of this server's processes (Ray's raylet, workers, HAProxy):
        # the ones seen while it ran, and any whose command line names its temp dir.
        time.sleep(1.0)
        leftovers = [p for p in self._known.values() if _alive(p)]
        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if proc.pid not in self._known and marker in " ".join(
                        proc.info["cmdline"] or []):
                    leftovers.append(proc)
        if leftovers:
            report["steps"].append(f"SIGKILL {len(leftovers)} leftover processes: " + ", ".join(
                f"{p.pid}:{process_name(p)}" for p in leftovers))
            for proc in leftovers:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(leftovers, timeout=10)
        # The port must be free again before the next target starts.
        for _ in range(40):
            if port_free(self.port):
                break
            time.sleep(0.25)
        else:
            report["steps"].append(f"port {self.port} still in use")
        if self._log is not None:
            self._log.close()
        report["stop_s"] = round(time.monotonic() - started, 2)
        return report

    def ray_logs(self, *patterns: str) -> list[Path]:
        """This server's Ray log files matching ``patterns`` (relative to the session's
        ``logs/``), each once: ``session_latest`` links to the session's own directory."""
        return sorted({path.resolve() for pattern in patterns
                       for path in self.temp_dir.glob(f"ray/session_*/logs/{pattern}")})

    def collect_ray_logs(self, into: Path, lines: int = 300) -> None:
        """Keep the tail of Ray Serve's own logs (controller, proxy, replicas)."""
        for path in self.ray_logs("serve/*.log"):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                into.mkdir(parents=True, exist_ok=True)
                (into / path.name).write_text("\n".join(tail) + "\n")

    def cleanup(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_name(proc: psutil.Process) -> str:
    """A process's name, or ``?`` once it is gone."""
    try:
        return proc.name()
    except psutil.Error:
        return "?"


def check_point(server: Server, point: dict[str, Any], label: str) -> None:
    """After a point: its errors mark the run failed (two samples logged); a server that
    exited during the load ends the run."""
    if point["errors"]:
        server.failed = True
        log(f"  error samples: {point['error_samples'][:2]}")
    if server.proc is not None and server.proc.poll() is not None:
        raise ServerFailed(f"{label} exited with {server.proc.returncode} during the load")


@contextlib.contextmanager
def serving(server: Server, run: dict[str, Any], logs_dir: Path, label: str, *,
            probe: bytes | None, startup_timeout: float,
            on_stop: Callable[[], object] | None = None) -> Iterator[Server]:
    """Start ``server`` and, given a ``probe`` body, wait until it is ready (``probe``,
    ``startup_s`` and ``ports`` go into ``run``); the body then runs its points. An
    exception in them is recorded as ``run["error"]`` (the next server still runs);
    whatever happens, the server is stopped with everything it started (``run["stop"]``;
    Ray's logs kept when it ``failed``), ``on_stop`` runs, and its temp dir goes. A
    second Ctrl-C or a SIGTERM cannot cut that teardown short."""
    run["server_log"] = rel(server.log_path)
    try:
        began = time.monotonic()
        server.start()
        if probe is not None:
            run["probe"] = server.wait_ready(startup_timeout, probe)
            run["startup_s"] = round(time.monotonic() - began, 2)
            run["ports"] = {"http": server.port, "direct_ingress": server.direct_port,
                            "load": server.load_port}
            log(f"{label}: ready in {run['startup_s']} s, load -> {server.infer_url()}")
        yield server
    except Exception as exc:  # record it, stop the server, go on to the next
        server.failed = True
        run["error"] = f"{type(exc).__name__}: {exc}"
        log(f"{label}: FAILED: {run['error'][:500]}")
    finally:
        previous = {signum: signal.signal(signum, signal.SIG_IGN)
                    for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            if server.failed and server.uses_ray:
                server.collect_ray_logs(logs_dir / f"{server.log_path.stem}-ray")
            run["stop"] = server.stop()
            if on_stop is not None:
                with contextlib.suppress(Exception):
                    on_stop()
            server.cleanup()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        log(f"{label}: stopped in {run['stop'].get('stop_s')} s "
            f"({', '.join(run['stop'].get('steps', []))})")


def new_run(key: str, name: str, repeat: int) -> dict[str, Any]:
    """A run's record: who (``key``: ``name``), which repeat, when, its points."""
    return {key: name, "repeat": repeat,
            "started_at": dt.datetime.now().isoformat(timespec="seconds"), "points": []}
