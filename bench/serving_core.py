"""Side-by-side benchmark: Keel against a plain FastAPI server and a naive Ray Serve app.

For each repeat, for each target: start the server in its own process group,
wait for ``GET /v2/health/ready`` to answer 200 and one inference to succeed,
sweep the concurrencies with the closed-loop load generator (``loadgen``),
read Keel's batch sizes, stop the server completely, go on to the next target.
Targets are interleaved per repeat so slow drift on the machine spreads over all
of them. Writes ``bench/results/<timestamp>.json`` (every run's figures and the
medians), ``<timestamp>.png`` (rps and p95 against concurrency) and prints a
markdown table of the medians.

    .venv/bin/python bench/run_bench.py                      # the full default run
    .venv/bin/python bench/run_bench.py --duration 3 --warmup 1 --repeats 1 \
        --concurrency 1 8 --targets keel baseline_fastapi    # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
from loadgen import install_fast_loop, make_bodies, run_load

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PYTHON = sys.executable

#: Switches that change how Ray Serve moves requests; every target starts without
#: them and adds only its own, so a target means the same thing in every shell.
STRIPPED_ENV_PREFIXES = ("RAY_SERVE_",)
STRIPPED_ENV = ("RAY_ADDRESS",)


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
           "load to the HTTP port (HAProxy)", env={**TP, "RAY_SERVE_ENABLE_HA_PROXY": "1"}),
    Target("keel_haproxy_nobatch", "keel",
           "keel_haproxy with max_batch_size 1 for every model: the batching gain's baseline",
           env={**TP, "RAY_SERVE_ENABLE_HA_PROXY": "1"},
           model_user_config={"max_batch_size": 1}),
    Target("keel_haproxy_wait0", "keel",
           "keel_haproxy with batch_wait_timeout_s 0: batches only what queued meanwhile",
           env={**TP, "RAY_SERVE_ENABLE_HA_PROXY": "1"},
           model_user_config={"batch_wait_timeout_s": 0.0}),
    Target("baseline_fastapi", "baseline",
           "one uvicorn process, FastAPI, one ONNX Runtime session, no batching"),
    Target("naive_serve", "naive",
           "one @serve.deployment with @serve.ingress(FastAPI), Ray defaults, no batching"),
]}
DEFAULT_TARGETS = ["keel", "keel_tp", "keel_tp_direct", "keel_haproxy", "baseline_fastapi",
                   "naive_serve"]
REFERENCES = ["baseline_fastapi", "naive_serve", "keel_haproxy_nobatch"]
METRICS = ["rps", "p50_ms", "p95_ms", "p99_ms", "error_rate"]


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- ports


def _port_free(port: int) -> bool:
    """Nothing listens on ``port`` (connections left in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(low: int, high: int, size: int) -> int:
    """The first port of ``size`` consecutive free ports in ``[low, high)``."""
    for _ in range(200):
        base = random.randrange(low, high - size)
        if all(_port_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports in [{low}, {high})")


# --------------------------------------------------------------------------- HTTP


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read(2000).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000).decode("utf-8", "replace")


def http_post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read(4000).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4000).decode("utf-8", "replace")


# --------------------------------------------------------------------------- servers


class ServerFailed(RuntimeError):
    """The server did not come up, or stopped answering."""


class Server:
    """One target's server process (and, for Ray targets, its private Ray instance)."""

    def __init__(self, target: Target, args: argparse.Namespace, log_path: Path) -> None:
        self.target = target
        self.args = args
        self.log_path = log_path
        self.temp_dir = Path(tempfile.mkdtemp(prefix="kb-"))  # short: Ray's socket paths
        # Below the ephemeral range (and Ray's worker ports, 10002-19999): a port picked
        # there can be taken by one of Ray's own gRPC servers before the server binds it
        # (seen once: the benchmark's first request got Ray's HTTP/2 frames).
        self.port = free_port_block(20000, 30000, 1)
        self.load_port = self.port
        #: Where Keel's gRPC server (grpc_options.port) listens, if its config has one.
        self.grpc_port = self.port
        while self.grpc_port == self.port:
            self.grpc_port = free_port_block(20000, 30000, 1)
        self.direct_port: int | None = None
        self.direct_base = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._known: dict[int, psutil.Process] = {}
        self.uses_ray = target.kind in ("keel", "naive")

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
        return env

    def _argv(self) -> list[str]:
        a = self.args
        common = ["--host", "127.0.0.1", "--port", str(self.port)]
        ray_common = ["--temp-dir", str(self.temp_dir)]
        if a.dashboard:
            ray_common += ["--dashboard-port", str(free_port())]
        if self.target.kind == "keel":
            extra = (["--model-user-config", json.dumps(self.target.model_user_config)]
                     if self.target.model_user_config else [])
            if self.target.deployment_options:
                extra += ["--deployment-options", json.dumps(self.target.deployment_options)]
            return [PYTHON, str(BENCH_DIR / "keel_server.py"), "--config", str(a.config),
                    "--grpc-port", str(self.grpc_port), *common, *ray_common, *extra]
        if self.target.kind == "naive":
            return [PYTHON, str(BENCH_DIR / "naive_serve.py"), "--model", a.model,
                    "--repository", str(a.repository), *common, *ray_common]
        return [PYTHON, str(BENCH_DIR / "baseline_fastapi.py"), "--model", a.model,
                "--repository", str(a.repository), *common]

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
        report["processes_seen"] = dict(Counter(_name(p) for p in self._known.values()))
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
                f"{p.pid}:{_name(p)}" for p in leftovers))
            for proc in leftovers:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(leftovers, timeout=10)
        # The port must be free again before the next target starts.
        for _ in range(40):
            if _port_free(self.port):
                break
            time.sleep(0.25)
        else:
            report["steps"].append(f"port {self.port} still in use")
        if self._log is not None:
            self._log.close()
        report["stop_s"] = round(time.monotonic() - started, 2)
        return report

    def collect_ray_logs(self, into: Path, lines: int = 300) -> None:
        """Keep the tail of Ray Serve's own logs (controller, proxy, replicas)."""
        for path in sorted(self.temp_dir.glob("ray/session_*/logs/serve/*.log")):
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


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


# --------------------------------------------------------------------------- runs


def batch_delta(before: dict[str, Any] | None, after: dict[str, Any] | None,
                model: str) -> dict[str, int] | None:
    """Batch sizes the model saw between two stats snapshots."""
    if not before or not after or "error" in before or "error" in after:
        return None
    try:
        old = Counter({int(k): v for k, v in before["models"][model]["batch_sizes"].items()})
        new = Counter({int(k): v for k, v in after["models"][model]["batch_sizes"].items()})
    except KeyError:
        return None
    new.subtract(old)
    return {str(k): v for k, v in sorted(new.items()) if v}


def mean_batch(sizes: dict[str, int] | None) -> float | None:
    if not sizes:
        return None
    calls = sum(sizes.values())
    return sum(int(k) * v for k, v in sizes.items()) / calls if calls else None


def run_target(target: Target, repeat: int, args: argparse.Namespace, bodies: list[bytes],
               logs_dir: Path) -> dict[str, Any]:
    """Start one target, sweep the concurrencies, stop it; everything it measured."""
    run: dict[str, Any] = {"target": target.name, "repeat": repeat,
                           "started_at": dt.datetime.now().isoformat(timespec="seconds"),
                           "points": []}
    log_path = logs_dir / f"{target.name}-r{repeat}.log"
    server = Server(target, args, log_path)
    run["server_log"] = _rel(log_path)
    failed = False
    try:
        began = time.monotonic()
        server.start()
        run["probe"] = server.wait_ready(args.startup_timeout, bodies[0])
        run["startup_s"] = round(time.monotonic() - began, 2)
        run["ports"] = {"http": server.port, "direct_ingress": server.direct_port,
                        "load": server.load_port}
        log(f"{target.name} r{repeat}: ready in {run['startup_s']} s, load -> "
            f"{server.infer_url()}")
        before = server.stats()
        for concurrency in args.concurrency:
            result = asyncio.run(run_load(server.infer_url(), concurrency, args.duration,
                                          args.warmup, bodies, args.request_timeout))
            point = result.to_dict()
            after = server.stats()
            point["batch_sizes"] = batch_delta(before, after, args.model)
            point["mean_batch"] = mean_batch(point["batch_sizes"])
            point["replicas"] = (after or {}).get("replicas")
            before = after
            run["points"].append(point)
            p95 = f"{point['p95_ms']:.1f}" if point["p95_ms"] is not None else "-"
            log(f"{target.name} r{repeat} c={concurrency}: {point['rps']:.0f} rps, "
                f"p95 {p95} ms, errors {point['errors']}"
                + (f", mean batch {point['mean_batch']:.1f}" if point["mean_batch"] else ""))
            if point["errors"]:
                failed = True
                log(f"  error samples: {point['error_samples'][:2]}")
            if server.proc is not None and server.proc.poll() is not None:
                raise ServerFailed(f"{target.name} exited with {server.proc.returncode} "
                                   f"during the load")
        run["stats_end"] = before
    except (ServerFailed, OSError, RuntimeError) as exc:
        failed = True
        run["error"] = str(exc)
        log(f"{target.name} r{repeat}: FAILED: {exc}")
    finally:
        if failed and server.uses_ray:
            server.collect_ray_logs(logs_dir / f"{target.name}-r{repeat}-ray")
        run["stop"] = server.stop()
        server.cleanup()
        log(f"{target.name} r{repeat}: stopped in {run['stop'].get('stop_s')} s "
            f"({', '.join(run['stop'].get('steps', []))})")
    return run


def median_or_none(values: Iterable[Any]) -> float | None:
    """The median of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def ratio(row: dict[str, Any], reference: dict[str, Any]) -> dict[str, float | None]:
    """``row`` over ``reference`` for throughput and the latency percentiles."""
    return {m: (row[m] / reference[m] if row[m] is not None and reference[m] else None)
            for m in ("rps", "p50_ms", "p95_ms", "p99_ms")}


def median_rows(runs: list[dict[str, Any]], run_key: str, names: list[str],
                concurrencies: Sequence[int | str], metrics: list[str], *,
                point_key: str = "concurrency") -> dict[str, dict[str, dict[str, Any]]]:
    """Per name (a run's ``run_key``) and concurrency: the number of repeats, the errors
    summed, and the median of each metric over the repeats. ``point_key`` names the
    field of a point that ``concurrencies`` are values of (e.g. a point's name)."""
    medians: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        medians[name] = {}
        for concurrency in concurrencies:
            points = [p for r in runs if r[run_key] == name for p in r["points"]
                      if p[point_key] == concurrency]
            if not points:
                continue
            row: dict[str, Any] = {"n": len(points),
                                   "errors": sum(p["errors"] for p in points)}
            for metric in metrics:
                row[metric] = median_or_none(p.get(metric) for p in points)
            medians[name][str(concurrency)] = row
    return medians


def ratios_against(medians: dict[str, dict[str, dict[str, Any]]], name: str,
                   reference: str) -> dict[str, dict[str, float | None]]:
    """``ratio`` per concurrency that both ``name`` and ``reference`` measured."""
    return {concurrency: ratio(row, medians[reference][concurrency])
            for concurrency, row in medians.get(name, {}).items()
            if medians.get(reference, {}).get(concurrency)}


def summarise(runs: list[dict[str, Any]], targets: list[str],
              concurrencies: list[int]) -> dict[str, Any]:
    """Medians per (target, concurrency) over the repeats, and Keel's ratios."""
    # mean_batch is None where no batch was seen (the references), never 0.
    medians = median_rows(runs, "target", targets, concurrencies, [*METRICS, "mean_batch"])
    ratios = {f"{keel}/{reference}": ratios_against(medians, keel, reference)
              for keel in targets if TARGETS[keel].kind == "keel"
              for reference in REFERENCES if reference in targets and reference != keel}
    return {"medians": medians, "ratios": ratios}


def markdown(summary: dict[str, Any], targets: list[str], concurrencies: list[int]) -> str:
    """The medians (and Keel's ratios) as markdown tables."""

    def fmt(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = ["| target | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in targets:
        for concurrency in concurrencies:
            row = summary["medians"].get(name, {}).get(str(concurrency))
            if row is None:
                lines.append(f"| {name} | {concurrency} | failed | | | | | |")
                continue
            lines.append(f"| {name} | {concurrency} | {fmt(row['rps'], 0)} | "
                         f"{fmt(row['p50_ms'])} | {fmt(row['p95_ms'])} | {fmt(row['p99_ms'])} | "
                         f"{row['errors']} | {fmt(row['mean_batch'])} |")
    if summary["ratios"]:
        lines += ["", "| ratio | concurrency | req/s | p50 | p95 | p99 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for key, by_concurrency in summary["ratios"].items():
            for concurrency, row in by_concurrency.items():
                lines.append(f"| {key} | {concurrency} | {fmt(row['rps'], 2)} | "
                             f"{fmt(row['p50_ms'], 2)} | {fmt(row['p95_ms'], 2)} | "
                             f"{fmt(row['p99_ms'], 2)} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], targets: list[str], path: Path, title: str, *,
         style: Callable[[str], str] | None = None, log_y: bool = True) -> None:
    """rps and p95 against concurrency, one line per target (medians). ``style`` gives a
    target's line style (default: solid for Keel, dashed otherwise); ``log_y`` puts both
    y axes on a log scale (else linear from 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, (ax_rps, ax_p95) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in targets:
        rows = summary["medians"].get(name, {})
        xs = sorted(int(c) for c in rows)
        if not xs:
            continue
        rps = [rows[str(x)]["rps"] for x in xs]
        p95 = [rows[str(x)]["p95_ms"] for x in xs]
        line = style(name) if style else ("-" if TARGETS[name].kind == "keel" else "--")
        ax_rps.plot(xs, rps, line, marker="o", label=name)
        ax_p95.plot(xs, [v if v is not None else float("nan") for v in p95], line,
                    marker="o", label=name)
    concurrencies = sorted({int(c) for rows in summary["medians"].values() for c in rows})
    # Log scales on both axes by default: the single-process baseline is an order of
    # magnitude above the Ray targets, which would otherwise lie flat on the floor.
    scale = ", log" if log_y else ""
    for ax, ylabel in ((ax_rps, f"requests/s (median{scale})"),
                       (ax_p95, f"p95 latency, ms (median{scale})")):
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        if concurrencies:
            ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    if ax_rps.lines:
        ax_rps.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    packages: dict[str, str | None] = {}
    for name in ("ray", "onnxruntime", "fastapi", "uvicorn", "aiohttp", "numpy", "keel"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "packages": packages}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Keel vs a plain FastAPI server vs a naive Ray Serve app, side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="targets: " + "; ".join(f"{t.name}: {t.description}"
                                       for t in TARGETS.values()))
    parser.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS, choices=list(TARGETS),
                        metavar="TARGET", help="which targets to run, in this order")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64],
                        help="closed-loop clients per point")
    parser.add_argument("--duration", type=float, default=10.0, help="measured s per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured s per point")
    parser.add_argument("--repeats", type=int, default=3, help="whole sweeps; medians over them")
    parser.add_argument("--model", default="risk_mlp", help="model to send the load to")
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "models",
                        help="model repository of the reference targets (Keel reads the "
                             "one in its config)")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "serve_config.yaml",
                        help="Keel's serve config (its HTTP port is replaced)")
    parser.add_argument("--pool", type=int, default=512, help="distinct request rows")
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--request-timeout", type=float, default=30.0, help="per request, s")
    parser.add_argument("--startup-timeout", type=float, default=240.0,
                        help="s to wait for a target to be ready")
    parser.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True,
                        help="start Ray's dashboard with the Ray targets, as `serve run` does")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="where the JSON, the PNG and the server logs go")
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(c < 1 for c in args.concurrency):
        parser.error("--repeats and --concurrency must be >= 1")
    # The servers run from the repository root.
    args.repository, args.config, args.out = (p.resolve() for p in
                                              (args.repository, args.config, args.out))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = args.repository / args.model
    if not model_dir.is_dir():
        log(f"{model_dir} does not exist: run `.venv/bin/keel prepare` first")
        return 2
    install_fast_loop()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    logs_dir = args.out / f"{stamp}-logs"
    logs_dir.mkdir()
    bodies = make_bodies(pool=args.pool, seed=args.seed)
    document: dict[str, Any] = {
        "started_at": dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": {n: TARGETS[n].description for n in args.targets},
        "environment": environment(),
        "runs": [],
    }
    json_path = args.out / f"{stamp}.json"
    began = time.monotonic()

    def save() -> None:
        document.update(summarise(document["runs"], args.targets, args.concurrency))
        document["elapsed_s"] = round(time.monotonic() - began, 1)
        json_path.write_text(json.dumps(document, indent=2) + "\n")

    interrupted = False
    try:
        for repeat in range(1, args.repeats + 1):
            for name in args.targets:
                document["runs"].append(run_target(TARGETS[name], repeat, args, bodies,
                                                   logs_dir))
                save()  # partial results survive an interrupted run
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured")
    save()
    png_path = json_path.with_suffix(".png")
    title = (f"{args.model}, {os.cpu_count()} CPUs shared by server and load generator, "
             f"{args.duration:g} s per point, median of {args.repeats}")
    plot(document, args.targets, png_path, title)
    table = markdown(document, args.targets, args.concurrency)
    print(table)
    log(f"wrote {_rel(json_path)} and {_rel(png_path)} in {document['elapsed_s']} s; "
        f"server logs in {_rel(logs_dir)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
