"""Chaos soak: half of Keel's maximum on the realistic mix while faults are injected.

1. A private world: a model repository copied from ``models/`` plus a second version of
   ``risk_gbdt`` (trained by the demo builder on another seed, so its answers differ),
   a private ``redis-server`` for the prediction cache (restarting it touches nobody
   else), and ``serve_config.yaml`` pointed at both, with ``risk_gbdt`` pinned to version
   1 and at least two replicas (``--min-replicas``: a hung or killed replica then
   leaves one that answers, as production runs it).
2. Keel under ``serve run`` with HAProxy, as ``make demo`` runs it (``bench.resilience.soak``'s
   server); its maximum on the mix measured by a closed-loop probe.
3. An open-loop load at ``--fraction`` (0.5) of that maximum for ``--duration`` s
   (1800): ``/v1/decide`` on ``risk_gbdt`` for Zipf entities, and OIP infer on
   ``risk_gbdt`` and ``risk_mlp`` for Zipf-drawn rows. A client retries once on a 503
   that carries Retry-After, after the time it names (at most 5 s).
4. A chaos loop, seeded: every 30-90 s one of
   ``kill_replica`` (SIGKILL a ``risk_gbdt`` replica),
   ``hang_replica`` (SIGSTOP one until Serve's health checks replace it, at most
   ``--hang-max`` s, then SIGCONT if it still exists),
   ``restart_redis`` (stop the cache's Redis, start it again 2 s later),
   ``stall_features`` (SIGSTOP the FeatureService replicas for 3 s),
   ``roll_version`` (``serve deploy`` through the dashboard's REST API with
   ``risk_gbdt`` at version 2, wait until answers name it, hold 15 s, deploy version 1
   again and wait for it).
   The faults act on the server's own process tree by PID; nothing else is touched.
5. Every answer is checked: an infer answer must equal, within 1e-4, what the ONNX file
   of the version it names computes for that row (computed here with ONNX Runtime); a
   decide answer must name a version that exists and, per entity and version, always
   carry the same score (the features do not change during the run), so a cached
   answer of one version served as another's shows.

Reports per minute: sent, answered OK (first try, after the retry), lost, p50/p95/p99,
faults; the success ratio over every 5-minute window; and every fault with its time.
Each lost request is listed (when it was sent, its route, its ``X-Request-ID``, the
status or the client's error, how long it took), and what the logs said is kept in
``<out>/<date>-chaos-logs/warnings.log`` (Serve's warnings, Keel's hedged calls and
stalled replicas; with ``--access-log``, every request that took a second or more, by
request id: where a lost one stopped). Writes ``<out>/<date>-chaos-soak.json`` and
``.png``::

    .venv/bin/python -m bench.resilience.chaos_soak                  # 30 minutes
    .venv/bin/python -m bench.resilience.chaos_soak --duration 300   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import psutil
import yaml

from bench import serving_core
from bench.harness.decide_load import make_workload
from bench.harness.http_load import install_fast_loop, zipf_indices
from bench.harness.network import quiet_port
from bench.harness.progress import Progress, log
from bench.harness.report import REPO_ROOT, RESULTS_DIR, pyplot, save_figure
from bench.harness.servers import TARGETS, Server, unbuffered_logs
from bench.harness.statistics import percentiles
from tests.support.redisserver import PrivateRedis

MODEL = "risk_gbdt"  # the model in its own deployment: the one the faults hit
INGRESS_MODEL = "risk_mlp"  # runs inside the ingress replicas
FAULTS = ("kill_replica", "hang_replica", "restart_redis", "stall_features", "roll_version")
WIDTH = 12
ATOL = 1e-4
LOST_SAMPLES = 200
#: The ingress's log line for a model call sent again (``hedge.first_answer``).
HEDGE_LINE = re.compile(r"attempt (\d+) of (\d+)")
#: Log lines worth keeping: Serve's warnings and errors, and Keel's own warnings (which a
#: replica's redirected stderr logs at INFO), access lines of requests that took seconds.
KEEP_LINE = re.compile(r"^(WARNING|ERROR)|attempt \d+ of \d+|routing around it|answers again"
                       r"|refresh failed| [0-9]{3} [0-9]{4,}\.[0-9]+ms")


# -- the private world ------------------------------------------------------------------------


def private_repository(into: Path, seed: int) -> Path:
    """``models/`` copied, plus ``risk_gbdt`` version 2 trained on another dataset seed."""
    from graph.demo.build import build_demo_repository
    from graph.demo.dataset import DatasetConfig

    repository = into / "models"
    shutil.copytree(REPO_ROOT / "models", repository,
                    ignore=shutil.ignore_patterns(".*", "README.md"))
    built = build_demo_repository(into / "v2-build", config=DatasetConfig(seed=seed),
                                  version="2")
    for model in built:
        if model.name == MODEL:
            # Over the candidate `keel prepare` wrote as version 2, if models/ holds it.
            shutil.copytree(model.path.parent, repository / MODEL / "2", dirs_exist_ok=True)
    return repository


#: ``risk_gbdt``'s CPU reservation here. serve_config.yaml reserves 1.85 CPUs with one
#: risk_gbdt replica (two Ingress at 0.5, FeatureService and LLMGateway at 0.25,
#: SloMonitor 0.1, risk_gbdt 0.25): on 2 cores a second replica at 0.25 does not fit, and
#: a replacement would wait for CPUs that never free up.
MODEL_CPUS = 0.05


def chaos_config(repository: Path, min_replicas: int, into: Path,
                 access_log: bool = False) -> Path:
    """serve_config.yaml over the private repository, ``risk_gbdt`` pinned to version 1,
    at least ``min_replicas`` of it, each reserving ``MODEL_CPUS``; ``access_log`` turns
    Serve's per-request log lines on (a diagnosis: not Keel as shipped)."""
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    if access_log:
        app.setdefault("logging_config", {})["enable_access_log"] = True
    app["args"]["model_repository"] = str(repository)
    app["args"]["feature_repo"] = str(REPO_ROOT / app["args"]["feature_repo"])
    for dep in app["deployments"]:
        if dep["name"] == MODEL:
            dep.setdefault("user_config", {})["version"] = "1"
            scaling = dep.get("autoscaling_config") or {}
            scaling["min_replicas"] = max(min_replicas, scaling.get("min_replicas", 1))
            scaling["max_replicas"] = max(scaling["min_replicas"],
                                          scaling.get("max_replicas", 1))
            dep["autoscaling_config"] = scaling
            dep.setdefault("ray_actor_options", {})["num_cpus"] = MODEL_CPUS
    path = into / "serve_config.chaos.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- what every answer must be ----------------------------------------------------------------


class References:
    """The expected infer outputs per (model, version, row) and the decide scores seen."""

    def __init__(self, repository: Path, rows: np.ndarray) -> None:
        self.rows = rows
        self.outputs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for model_dir in (repository / MODEL, repository / INGRESS_MODEL):
            for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                session = ort.InferenceSession(str(version_dir / "model.onnx"),
                                               providers=["CPUExecutionProvider"])
                names = [o.name for o in session.get_outputs()]
                found = session.run(names, {session.get_inputs()[0].name: rows})
                self.outputs[(model_dir.name, version_dir.name)] = dict(
                    zip(names, found, strict=True))
        self.decide_scores: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()

    def check_infer(self, model: str, row: int, answer: dict[str, Any]) -> str | None:
        """None when right; else what is wrong."""
        version = str(answer.get("model_version"))
        expected = self.outputs.get((model, version))
        if expected is None:
            return f"{model}: answer names unknown version {version!r}"
        for output in answer.get("outputs", []):
            want = expected.get(output["name"])
            if want is None:
                return f"{model} v{version}: unexpected output {output['name']!r}"
            got = np.asarray(output["data"], dtype=np.float64).reshape(-1)
            if not np.allclose(got, np.asarray(want[row], dtype=np.float64).reshape(-1),
                               atol=ATOL):
                return (f"{model} v{version} row {row}: {output['name']} {got.tolist()} != "
                        f"{np.asarray(want[row]).reshape(-1).tolist()}")
        return None

    def check_decide(self, entity: str, answer: dict[str, Any]) -> str | None:
        version = str(answer.get("model_version"))
        if (MODEL, version) not in self.outputs:
            return f"decide names unknown version {version!r}"
        score = float(answer["results"][0]["score"])
        with self.lock:
            first = self.decide_scores.setdefault((entity, version), score)
        if abs(first - score) > ATOL:
            return f"decide {entity} v{version}: score {score} != {first} seen before"
        return None


@dataclass
class Request:
    kind: str  # "decide" | model name (infer)
    url: str
    body: bytes
    key: str | int  # the entity pair (decide) or the row index (infer)


class Mix:
    """Half decide (Zipf entity pairs), a quarter infer on each model (Zipf rows)."""

    def __init__(self, base: str, rows: np.ndarray, seed: int, zipf_s: float = 1.1) -> None:
        self.rng = random.Random(seed)
        workload = make_workload("zipf", model=MODEL, seed=seed)
        self.decide = [(b, self._entity(b)) for b in workload.bodies]
        self.rows = rows
        generator = np.random.default_rng(seed)
        self.row_draws = zipf_indices(generator, len(rows), 200_000, zipf_s).tolist()
        self.base = base
        self._d = 0
        self._r = 0

    @staticmethod
    def _entity(body: bytes) -> str:
        entity = json.loads(body)["entities"][0]
        return f"{entity['symbol']}/{entity['account_id']}"

    def body_for_row(self, row: int) -> bytes:
        document = {"inputs": [{"name": "features", "shape": [1, WIDTH], "datatype": "FP32",
                                "data": self.rows[row].tolist()}]}
        return json.dumps(document, separators=(",", ":")).encode()

    def next(self) -> Request:
        draw = self.rng.random()
        if draw < 0.5:
            body, entity = self.decide[self._d % len(self.decide)]
            self._d += 1
            return Request("decide", f"{self.base}/v1/decide", body, entity)
        row = self.row_draws[self._r % len(self.row_draws)]
        self._r += 1
        model = MODEL if draw < 0.75 else INGRESS_MODEL
        return Request(model, f"{self.base}/v2/models/{model}/infer",
                       self.body_for_row(row), row)


# -- the load -----------------------------------------------------------------------------------


@dataclass
class Window:
    start_s: float
    sent: int = 0
    ok_first: int = 0
    ok_retried: int = 0
    retried: int = 0
    lost: int = 0
    wrong: int = 0
    first_statuses: Counter[str] = field(default_factory=Counter)
    final_statuses: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    def merge(self, other: Window) -> None:
        for name in ("sent", "ok_first", "ok_retried", "retried", "lost", "wrong"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first_statuses.update(other.first_statuses)
        self.final_statuses.update(other.final_statuses)
        self.versions.update(other.versions)
        self.latencies_ms.extend(other.latencies_ms)

    def summary(self) -> dict[str, Any]:
        answered = self.ok_first + self.ok_retried + self.lost
        return {
            "t_s": round(self.start_s, 1), "sent": self.sent, "ok_first_try": self.ok_first,
            "ok_after_retry": self.ok_retried, "retried": self.retried, "lost": self.lost,
            "wrong": self.wrong,
            "success_first_try": round(self.ok_first / answered, 6) if answered else None,
            "success": round((self.ok_first + self.ok_retried) / answered, 6)
            if answered else None,
            "first_statuses": dict(self.first_statuses),
            "final_statuses": dict(self.final_statuses),
            "versions": dict(self.versions),
            **percentiles(self.latencies_ms, digits=2),
        }


class Load:
    def __init__(self, mix: Mix, references: References, timeout_s: float,
                 wrong_samples: list[dict[str, Any]]) -> None:
        self.mix = mix
        self.references = references
        self.timeout_s = timeout_s
        self.wrong_samples = wrong_samples
        #: Every request lost after its retry (at most LOST_SAMPLES): when it was sent,
        #: what it asked, what came back (or which error), and how long it took.
        self.lost_samples: list[dict[str, Any]] = []
        self.began = time.monotonic()
        self.sent = 0  # numbers the requests' X-Request-ID (Serve logs it as request_id)

    async def _post(self, session: aiohttp.ClientSession, request: Request,
                    request_id: str) -> tuple[int, str | None, bytes]:
        """(status, Retry-After, body); status 0 with the error's kind as the body when
        no HTTP answer came (a client timeout, a refused or reset connection)."""
        try:
            async with session.post(request.url, data=request.body,
                                    headers={"Content-Type": "application/json",
                                             "X-Request-ID": request_id},
                                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as r:
                return r.status, r.headers.get("Retry-After"), await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, None, f"{type(exc).__name__}: {exc}"[:200].encode()

    def _check(self, request: Request, body: bytes) -> tuple[str, str | None]:
        try:
            answer = json.loads(body)
        except ValueError:
            return "?", "answer is not JSON"
        if request.kind == "decide":
            return str(answer.get("model_version")), self.references.check_decide(
                str(request.key), answer)
        return str(answer.get("model_version")), self.references.check_infer(
            request.kind, int(request.key), answer)

    async def one(self, session: aiohttp.ClientSession, request: Request,
                  window: Window) -> None:
        started = time.perf_counter()
        sent_at = time.monotonic() - self.began
        self.sent += 1
        request_id = f"chaos-{self.sent}"
        status, retry_after, body = await self._post(session, request, request_id)
        first_status = status
        window.first_statuses[str(status)] += 1
        retried = False
        if status == 503 and retry_after is not None:
            retried = True
            window.retried += 1
            with contextlib.suppress(ValueError):
                await asyncio.sleep(min(5.0, max(0.0, float(retry_after))))
            status, _, body = await self._post(session, request, f"{request_id}-retry")
        window.final_statuses[str(status)] += 1
        if status != 200:
            window.lost += 1
            if len(self.lost_samples) < LOST_SAMPLES:
                self.lost_samples.append({
                    "sent_t_s": round(sent_at, 2), "id": request_id, "kind": request.kind,
                    "key": request.key, "first_status": first_status, "status": status,
                    "retried": retried,
                    "took_s": round(time.perf_counter() - started, 2),
                    "answer": body[:300].decode(errors="replace")})
            return
        latency = (time.perf_counter() - started) * 1000
        window.latencies_ms.append(latency)
        version, wrong = self._check(request, body)
        window.versions[f"{'decide' if request.kind == 'decide' else request.kind}:"
                        f"{version}"] += 1
        if wrong is not None:
            window.wrong += 1
            if len(self.wrong_samples) < 50:
                self.wrong_samples.append({"t_s": window.start_s, "what": wrong})
        if retried:
            window.ok_retried += 1
        else:
            window.ok_first += 1

    async def closed_loop(self, concurrency: int, duration_s: float) -> float:
        """The answered-OK rate of ``concurrency`` clients (the maximum on the mix)."""
        window = Window(0.0)
        deadline = time.monotonic() + duration_s
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def client() -> None:
                while time.monotonic() < deadline:
                    await self.one(session, self.mix.next(), window)
            await asyncio.gather(*(client() for _ in range(concurrency)))
        return (window.ok_first + window.ok_retried) / duration_s

    async def open_loop(self, rate: float, duration_s: float, interval_s: float,
                        on_window: Any) -> list[Window]:
        windows: list[Window] = []
        pending: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            began = self.began = time.monotonic()
            sent = reported = 0
            while (now := time.monotonic() - began) < duration_s:
                index = int(now // interval_s)
                while len(windows) <= index:
                    windows.append(Window(start_s=len(windows) * interval_s))
                for _ in range(max(0, int(now * rate) - sent)):
                    task = asyncio.create_task(self.one(session, self.mix.next(),
                                                        windows[index]))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    windows[index].sent += 1
                    sent += 1
                # A window is reported once its requests had time to be answered.
                while reported < index - 1 or (
                        reported < index and now - index * interval_s > interval_s / 2):
                    on_window(windows[reported])
                    reported += 1
                await asyncio.sleep(0.002)
            if pending:
                await asyncio.wait(pending, timeout=self.timeout_s * 2 + 10)
            for window in windows[reported:]:
                on_window(window)
        return windows


# -- the chaos loop ----------------------------------------------------------------------------


class Chaos:
    """Seeded faults on the server's own process tree, one every ``gap`` seconds."""

    def __init__(self, server: Server, redis: PrivateRedis, base: str, seed: int,
                 gap: tuple[float, float], hang_max_s: float, faults: tuple[str, ...]) -> None:
        self.server = server
        self.redis = redis
        # What the server deployed (its ports, the private repository): what `serve
        # deploy` sends again with one field changed.
        self.config = yaml.safe_load((server.temp_dir / "serve_config.bench.yaml").read_text())
        self.base = base
        self.rng = random.Random(seed)
        self.gap = gap
        self.hang_max_s = hang_max_s
        self.faults = faults
        self.events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._began = 0.0

    # -- processes

    def _replicas(self, deployment: str) -> list[psutil.Process]:
        self.server._remember_processes()
        found = []
        for proc in list(self.server._known.values()):
            with contextlib.suppress(psutil.Error):
                # Ray's process title names the method a busy replica runs after a dot.
                title = (proc.cmdline() or [""])[0].split(".")[0]
                if title == f"ray::ServeReplica:keel:{deployment}" and proc.is_running() \
                        and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return sorted(found, key=lambda p: p.pid)

    def _wait(self, what: str, done: Any, timeout_s: float) -> float | None:
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            with contextlib.suppress(Exception):
                if done():
                    return round(time.monotonic() - began, 1)
            if self._stop.wait(0.5):
                return None
        log(f"chaos: {what} not within {timeout_s:g} s")
        return None

    # -- the faults

    def kill_replica(self) -> dict[str, Any]:
        replicas = self._replicas(MODEL)
        victim = self.rng.choice(replicas)
        before = {p.pid for p in replicas}
        victim.send_signal(signal.SIGKILL)
        replaced = self._wait("a replacement replica", lambda: len(
            {p.pid for p in self._replicas(MODEL)} - before) >= 1, 120)
        return {"pid": victim.pid, "replicas_before": len(replicas), "replaced_after_s": replaced}

    def hang_replica(self) -> dict[str, Any]:
        replicas = self._replicas(MODEL)
        victim = self.rng.choice(replicas)
        victim.send_signal(signal.SIGSTOP)
        try:
            gone = self._wait("the hung replica's removal", lambda: not victim.is_running()
                              or victim.status() == psutil.STATUS_ZOMBIE, self.hang_max_s)
        finally:
            with contextlib.suppress(psutil.Error):
                victim.send_signal(signal.SIGCONT)
        return {"pid": victim.pid, "removed_after_s": gone}

    def restart_redis(self) -> dict[str, Any]:
        self.redis.stop()
        self._stop.wait(2.0)
        self.redis.start()
        return {"down_s": 2.0}

    def stall_features(self) -> dict[str, Any]:
        replicas = self._replicas("FeatureService")
        for proc in replicas:
            proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(3.0)
        finally:
            for proc in replicas:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGCONT)
        return {"pids": [p.pid for p in replicas], "stalled_s": 3.0}

    def _deploy(self, version: str) -> float | None:
        config = json.loads(json.dumps(self.config))
        for dep in config["applications"][0]["deployments"]:
            if dep["name"] == MODEL:
                dep["user_config"]["version"] = version
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.server.dashboard_port}/api/serve/applications/",
            data=json.dumps(config).encode(), method="PUT",
            headers={"Content-Type": "application/json", **auth_header()})
        with urllib.request.urlopen(request, timeout=30) as answer:
            if answer.status != 200:
                raise RuntimeError(f"serve deploy answered {answer.status}")
        probe = Mix(self.base, np.zeros((1, WIDTH), dtype=np.float32), 1).body_for_row(0)

        def serving() -> bool:
            # Every replica must have moved: several answers in a row name the version.
            for _ in range(8):
                request = urllib.request.Request(
                    f"{self.base}/v2/models/{MODEL}/infer", data=probe,
                    headers={"Content-Type": "application/json",
                             "Cache-Control": "no-cache"})
                with urllib.request.urlopen(request, timeout=10) as answer:
                    if json.loads(answer.read())["model_version"] != version:
                        return False
            return True
        return self._wait(f"version {version} answering", serving, 180)

    def roll_version(self) -> dict[str, Any]:
        forward = self._deploy("2")
        self._stop.wait(15.0)
        back = self._deploy("1")
        return {"to_v2_s": forward, "back_to_v1_s": back}

    # -- the loop

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(*self.gap)):
            fault = self.rng.choice(self.faults)
            at = round(time.monotonic() - self._began, 1)
            log(f"chaos t={at:g}s: {fault}")
            event: dict[str, Any] = {"t_s": at, "fault": fault}
            try:
                event.update(getattr(self, fault)())
            except Exception as exc:
                event["error"] = f"{type(exc).__name__}: {exc}"[:300]
                log(f"chaos: {fault} failed: {event['error']}")
            event["took_s"] = round(time.monotonic() - self._began - at, 1)
            self.events.append(event)

    def __enter__(self) -> Chaos:
        self._began = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=300)


def auth_header() -> dict[str, str]:
    """Ray's dashboard asks for the token Ray keeps in ``~/.ray/auth_token`` (or
    ``$RAY_AUTH_TOKEN``) when token authentication is on; none when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path.home() / ".ray" / "auth_token"
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


# -- report ---------------------------------------------------------------------------------------


LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def serve_log_findings(server: Server, wall_began: float, into: Path) -> dict[str, Any]:
    """What the run's logs said: Serve's own (controller, replicas: WARNING and ERROR
    lines) and the replicas' stderr, where Keel's warnings go (the ingress's hedged
    model calls, the router's stalled replicas). Kept in ``into/warnings.log``; the
    hedged attempts (2 and up) counted, with the time into the run where the line has
    one."""
    attempts: Counter[str] = Counter()
    hedges: list[dict[str, Any]] = []
    kept: list[str] = []
    for path in server.ray_logs("serve/*.log", "worker-*.err"):
        with contextlib.suppress(OSError), path.open(errors="replace") as lines:
            for line in lines:
                if path.suffix == ".log" and not KEEP_LINE.search(line):
                    continue
                kept.append(f"{path.name}: {line.rstrip()}")
                found = HEDGE_LINE.search(line)
                if found is None:
                    continue
                attempts[found.group(1)] += 1
                stamp = LOG_TIME.search(line)
                if stamp is not None and len(hedges) < 2000:
                    wall = dt.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
                    hedges.append({"t_s": round(wall.timestamp() - wall_began, 2),
                                   "attempt": int(found.group(1))})
    into.mkdir(parents=True, exist_ok=True)
    (into / "warnings.log").write_text("\n".join(kept) + "\n")
    return {"hedged_attempts": dict(sorted(attempts.items())),
            "hedges": sorted(hedges, key=lambda h: h["t_s"]),
            "stalled_replica_lines": sum("routing around it" in line for line in kept),
            "warning_lines": len(kept), "kept_in": str(into)}



def per_minute(windows: list[Window], interval_s: float) -> list[Window]:
    size = max(1, int(60 // interval_s))
    merged = []
    for i in range(0, len(windows), size):
        minute = Window(start_s=windows[i].start_s)
        for window in windows[i:i + size]:
            minute.merge(window)
        merged.append(minute)
    return merged


def rolling_success(windows: list[Window], interval_s: float,
                    span_s: float = 300.0) -> list[dict[str, Any]]:
    """Success (after the retry) over every ``span_s`` window, stepped by one interval."""
    size = max(1, int(span_s // interval_s))
    out = []
    for i in range(0, max(1, len(windows) - size + 1)):
        group = windows[i:i + size]
        ok = sum(w.ok_first + w.ok_retried for w in group)
        answered = ok + sum(w.lost for w in group)
        first = sum(w.ok_first for w in group)
        out.append({"from_s": group[0].start_s, "to_s": group[-1].start_s + interval_s,
                    "success": round(ok / answered, 6) if answered else None,
                    "success_first_try": round(first / answered, 6) if answered else None})
    return out


def plot(document: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    minutes = document["minutes"]
    t = [m["t_s"] / 60 for m in minutes]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for key, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
        top.plot(t, [m[key] for m in minutes], style, label=key.replace("_ms", ""))
    top.set_ylabel("latency incl. retry, ms")
    top.set_yscale("log")
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left")
    bottom.plot(t, [100 * (m["success_first_try"] or 0) for m in minutes],
                label="OK on the first try, %")
    bottom.plot(t, [100 * (m["success"] or 0) for m in minutes], label="OK after one retry, %")
    bottom.axhline(99.9, color="grey", linestyle="--", label="SLO 99.9 %")
    lowest = min([100 * (m["success_first_try"] or 0) for m in minutes] + [99.8])
    bottom.set_ylim(max(0.0, lowest - 0.1), 100.02)  # not matplotlib's ±4 % around a flat 100
    bottom.set_ylabel("success, %")
    bottom.set_xlabel("minutes")
    bottom.grid(True, alpha=0.3)
    colours = dict(zip(FAULTS, ("red", "purple", "orange", "green", "blue"), strict=True))
    for event in document["faults"]:
        for axis in (top, bottom):
            axis.axvline(event["t_s"] / 60, color=colours.get(event["fault"], "black"),
                         alpha=0.4, linewidth=1)
    handles = [plt.Line2D([], [], color=c, alpha=0.6, label=f) for f, c in colours.items()]
    bottom.legend(handles=bottom.get_legend_handles_labels()[0] + handles, loc="lower left",
                  fontsize=7)
    save_figure(fig, path, document["title"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.resilience.chaos_soak",
                                     description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=float, default=1800.0, help="soak seconds")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds per window")
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="share of the measured maximum throughput to hold")
    parser.add_argument("--max-rps", type=float, help="skip the probe: the maximum is this")
    parser.add_argument("--probe-s", type=float, default=20.0)
    parser.add_argument("--probe-concurrency", type=int, default=32)
    parser.add_argument("--gap", type=float, nargs=2, default=(30.0, 90.0),
                        metavar=("MIN", "MAX"), help="seconds between faults")
    parser.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS)
    parser.add_argument("--hang-max", type=float, default=120.0,
                        help="longest a replica stays stopped (then SIGCONT)")
    parser.add_argument("--min-replicas", type=int, default=2,
                        help=f"at least this many {MODEL} replicas")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--access-log", action="store_true",
                        help="Serve logs every request (to find where a lost one stopped; "
                             "costs throughput, so not for the figures)")
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1 or not 0 < args.gap[0] <= args.gap[1]:
        parser.error("--fraction must be in (0, 1] and --gap MIN <= MAX, both > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (REPO_ROOT / "models" / MODEL).is_dir():
        log("no demo models: run `.venv/bin/keel prepare` (or `make prepare`) first")
        return 2
    install_fast_loop()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat()
    json_path = args.out / f"{stamp}-chaos-soak.json"
    work = Path(tempfile.mkdtemp(prefix="keel-chaos-"))
    redis = PrivateRedis(quiet_port(), directory=work)
    log("building the private model repository (risk_gbdt version 2)")
    repository = private_repository(work, seed=args.seed % 1000 + 8)
    config_path = chaos_config(repository, args.min_replicas, work, args.access_log)
    rows = np.random.default_rng(args.seed).standard_normal((20_000, WIDTH)).astype(np.float32)
    rows = np.round(rows, 6)
    references = References(repository, rows)
    wrong: list[dict[str, Any]] = []
    document: dict[str, Any] = {
        "started_at": dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpus": os.cpu_count()}
    server_args = serving_core.parse_args(["--config", str(config_path), "--out", str(args.out)])
    # Replica logs unbuffered: Keel's warnings (hedged calls, stalled replicas) are read
    # from them at the end, and a buffered record dies with its replica.
    server = Server(unbuffered_logs(TARGETS["keel_haproxy"]), server_args,
                    args.out / f"{stamp}-chaos-server.log")
    os.environ["KEEL_REDIS_URL"] = redis.url  # Server passes KEEL_* on to Keel
    redis.start()
    try:
        server.start()
        server.wait_ready(300, Mix("", rows, 1).body_for_row(0))
        base = f"http://127.0.0.1:{server.load_port}"
        load = Load(Mix(base, rows, args.seed), references, args.request_timeout, wrong)
        asyncio.run(load.closed_loop(4, 5.0))  # warm every path
        max_rps = args.max_rps or asyncio.run(load.closed_loop(args.probe_concurrency,
                                                               args.probe_s))
        rate = max_rps * args.fraction
        document.update(max_rps=round(max_rps, 1), target_rps=round(rate, 1))
        log(f"maximum {max_rps:.0f} req/s; holding {rate:.0f} req/s for {args.duration:g} s "
            f"with a fault every {args.gap[0]:g}-{args.gap[1]:g} s")
        chaos = Chaos(server, redis, base, args.seed, tuple(args.gap), args.hang_max,
                      tuple(args.faults))
        with chaos, Progress("chaos soak", math.ceil(args.duration / args.interval),
                             unit="windows") as progress:
            def on_window(window: Window) -> None:
                s = window.summary()
                log(f"t={s['t_s']:>6}s sent {s['sent']:>5} ok {s['ok_first_try']:>5}"
                    f"+{s['ok_after_retry']} lost {s['lost']} wrong {s['wrong']} "
                    f"p50 {s['p50_ms']} p95 {s['p95_ms']} p99 {s['p99_ms']} ms")
                progress.advance(f"t={s['t_s']:g} s")
            progress.step(f"{rate:.0f} req/s")
            wall_began = time.time()
            windows = asyncio.run(load.open_loop(rate, args.duration, args.interval,
                                                 on_window))
        document["serve_logs"] = serve_log_findings(
            server, wall_began, args.out / f"{stamp}-chaos-logs")
    finally:
        document["stop"] = server.stop()
        server.cleanup()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    total = Window(0.0)
    for window in windows:
        total.merge(window)
    minutes = per_minute(windows, args.interval)
    faults_by_minute = Counter(int(e["t_s"] // 60) for e in chaos.events)
    rolling = rolling_success(windows, args.interval)
    worst = min((r["success"] for r in rolling if r["success"] is not None), default=None)
    document.update({
        "title": (f"Keel chaos soak: {rate:.0f} req/s ({args.fraction:.0%} of the measured "
                  f"{max_rps:.0f}) for {args.duration / 60:g} min, a fault every "
                  f"{args.gap[0]:g}-{args.gap[1]:g} s, {os.cpu_count()} CPUs shared with "
                  "the load generator"),
        "minutes": [{**m.summary(), "faults": faults_by_minute.get(i, 0)}
                    for i, m in enumerate(minutes)],
        "windows": [w.summary() for w in windows],
        "faults": chaos.events,
        "fault_counts": dict(Counter(e["fault"] for e in chaos.events)),
        "rolling_5min": rolling,
        "worst_5min_success": worst,
        "total": total.summary(),
        "wrong_samples": wrong,
        "lost_samples": load.lost_samples,
    })
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    plot(document, json_path.with_suffix(".png"))
    print(f"\n{document['title']}\n")
    print("| minute | sent | OK first try | OK after retry | lost | wrong | p50 ms | p95 ms "
          "| p99 ms | faults |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, m in enumerate(document["minutes"]):
        print(f"| {i} | {m['sent']} | {m['ok_first_try']} | {m['ok_after_retry']} | {m['lost']} "
              f"| {m['wrong']} | {m['p50_ms']} | {m['p95_ms']} | {m['p99_ms']} | "
              f"{m['faults']} |")
    t = document["total"]
    print(f"| all | {t['sent']} | {t['ok_first_try']} | {t['ok_after_retry']} | {t['lost']} "
          f"| {t['wrong']} | {t['p50_ms']} | {t['p95_ms']} | {t['p99_ms']} | "
          f"{len(chaos.events)} |\n")
    print("Faults:", ", ".join(f"{k} x{v}" for k, v in document["fault_counts"].items()))
    for event in chaos.events:
        print("  ", json.dumps(event))
    print(f"Worst 5-minute success after one retry: {worst}; first statuses "
          f"{dict(total.first_statuses)}; final {dict(total.final_statuses)}")
    print(f"Hedged model calls (attempt: count): "
          f"{document['serve_logs']['hedged_attempts']}")
    for lost in load.lost_samples[:20]:
        print("   lost:", json.dumps(lost))
    log(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0 if t["lost"] == 0 and t["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
