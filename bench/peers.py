"""Keel side by side with the servers a platform engineer would pick instead.

One run, the same model (``risk_mlp``, the latest version in ``models/``), the same Open
Inference Protocol calls, REST (``POST /v2/models/risk_mlp/infer``, FP32 ``features``
``[rows, 12]``, by the closed-loop aiohttp load generator ``harness.http_load``) and gRPC
(``inference.GRPCInferenceService/ModelInfer``, the same input as
``raw_input_contents``, by its closed-loop ``grpc.aio`` twin ``harness.grpc_load``; the ``grpc_*``
points, for every server with a gRPC port: all but FastAPI):

- ``keel``: Keel as ``make demo`` runs it (serving_core's ``keel_haproxy`` target:
  ``serve run serve_config.yaml`` via ``harness.keel_server`` with
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1``; only the ports and the
  cache's key prefix differ from the shipped config; gRPC through HAProxy's gRPC frontend
  on ``grpc_options.port``, when the config has ``grpc_options``: else Keel's gRPC points
  are marked unavailable);
- ``kserve`` / ``kserve_2w``: KServe 0.21's python ``ModelServer`` with a ``kserve.Model``
  over ONNX Runtime (``harness.peer_servers``), 1 worker / ``--workers 2``;
- ``mlserver``: MLServer 1.7 with an ``MLModel`` over ONNX Runtime (``peers.py``),
  adaptive batching on (``max_batch_size`` 32, ``max_batch_time`` 2 ms);
- ``fastapi``: ``harness.baseline_fastapi``, one uvicorn process.

KServe and MLServer each run from their own venv under ``bench/.venvs/`` (made on first
use). For each repeat, each server in turn is started, checked (one 4-row request whose
answer must match ONNX Runtime's, computed here, and Keel's; with gRPC points, the same
4 rows over gRPC too, whose answer must match ONNX Runtime's and the server's REST
answer), driven through the points, and stopped with its whole process tree. With the
``decide`` point, each repeat also runs the ``decide`` scenario's Keel and ``baseline_decide``
servers (hit and miss workloads).
Writes ``results/<date>-peers.json`` (every repeat, the medians, Keel's ratios: to each
peer, and Keel gRPC to Keel REST and to the best peer's gRPC) and ``.png``;
``--markdown`` prints the tables. ``--points`` takes point names and groups: ``rest``
(c1 c8 c32 c8x64), ``grpc`` (their gRPC twins), ``zipf``, ``decide``.

    .venv/bin/python -m bench.peers --markdown              # the full default run
    .venv/bin/python -m bench.peers --points rest grpc --markdown   # REST + gRPC only
    .venv/bin/python -m bench.peers --servers kserve mlserver fastapi \\
        --duration 2 --warmup 1 --repeats 1                 # a smoke run
    .venv/bin/python -m bench.peers --render bench/results/2026-12-02-peers.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import signal
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import yaml

from bench import decide as decide_scenario
from bench.harness import grpc_load, options, peer_servers
from bench.harness.baseline_fastapi import latest_model_file
from bench.harness.cache_keys import delete_prefix, redis_client
from bench.harness.http_load import install_fast_loop, make_row_bodies, make_zipf_bodies, run_load
from bench.harness.network import free_port
from bench.harness.progress import Progress, log
from bench.harness.report import (
    REPO_ROOT,
    RunDocument,
    environment,
    fmt,
    pyplot,
    ratio_table,
    rel,
    run_interruptibly,
    save_figure,
    settings_of,
    stamped_paths,
)
from bench.harness.servers import (
    TARGETS as BENCH_TARGETS,
)
from bench.harness.servers import (
    Server,
    ServerFailed,
    Target,
    check_point,
    new_run,
    serving,
)
from bench.harness.statistics import median_rows, ratio, ratios_against
from graph.config_check import grpc_port

#: Keel's prediction-cache keys go under this prefix (emptied before each point and at
#: the end), so the benchmark never touches the keys of another Keel on the same Redis.
KEEL_KEY_PREFIX = "keelbench:peers:"
VENVS_DIR = REPO_ROOT / "bench" / ".venvs"
#: Set by SIGTERM (Ctrl-C is asyncio.run's to handle). The handler also raises
#: KeyboardInterrupt, but one raised inside uvloop's event loop may not surface; the run
#: checks this flag after every point and between servers, so it stops (and stops its
#: servers) all the same.
STOP = threading.Event()


def check_stop() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt("stop requested")


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class PeerTarget(Target):
    """A server that is not Keel: KServe, MLServer or the FastAPI baseline."""

    #: KServe's ``--workers`` (uvicorn processes).
    workers: int = 1
    #: The venv under ``bench/.venvs`` it runs from (None: Keel's own).
    venv: str | None = None


SERVERS: dict[str, Target] = {t.name: t for t in [
    dataclasses.replace(
        BENCH_TARGETS["keel_haproxy"], name="keel",
        description="Keel as `make demo` runs it: serve_config.yaml, "
                    "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1, load to "
                    "HAProxy on the HTTP port; prediction cache on (key prefix "
                    f"{KEEL_KEY_PREFIX}), observability as shipped"),
    dataclasses.replace(
        BENCH_TARGETS["keel_haproxy"], name="keel_1r",
        description="keel with ONE Ingress replica (the shipped config runs two)",
        deployment_options={"Ingress": {"num_replicas": 1}}),
    dataclasses.replace(
        BENCH_TARGETS["keel_haproxy"], name="keel_nocache",
        description="keel with the prediction cache off (the reference for what the cache "
                    "costs on a workload without hits; not in the default run)",
        deployment_options={"Ingress": {"user_config": {"cache": {"enabled": False}}}}),
    PeerTarget("kserve", "kserve",
               "KServe 0.21 python ModelServer, a kserve.Model over one ONNX Runtime "
               "session, 1 worker (KServe's defaults otherwise: gRPC server on, latency log "
               "line per request)", venv="kserve"),
    PeerTarget("kserve_2w", "kserve", "the same with --workers 2 (two uvicorn processes "
               "spawned by KServe's RESTServerMultiProcess; its gRPC server stays one, in "
               "the parent process)", workers=2, venv="kserve"),
    PeerTarget("mlserver", "mlserver",
               "MLServer 1.7, an MLModel over one ONNX Runtime session, adaptive batching "
               "(max_batch_size 32, max_batch_time 2 ms), MLServer's defaults otherwise (one "
               "parallel inference worker process)", venv="mlserver"),
    PeerTarget("fastapi", "baseline",
               "baseline_fastapi: one uvicorn process, FastAPI + pydantic, one ONNX "
               "Runtime session, no batching"),
]}
REFERENCES = ["kserve", "kserve_2w", "mlserver", "fastapi", "keel_1r", "keel_nocache"]
#: The servers that are not Keel (for "Keel gRPC / the best peer's gRPC").
PEERS = ["kserve", "kserve_2w", "mlserver", "fastapi"]
DEFAULT_SERVERS = [name for name in SERVERS if name != "keel_nocache"]


class PeerServer(Server):
    """A ``Server`` (start, readiness, stop of the whole process tree) for the peers
    too, plus the CPU time of the server's process tree."""

    def __init__(self, target: Target, args: argparse.Namespace, log_path: Path,
                 venvs: dict[str, Path]) -> None:
        super().__init__(target, args, log_path)
        self.venvs = venvs

    def _env(self) -> dict[str, str]:
        env = super()._env()
        if self.target.kind in ("kserve", "mlserver"):
            # bench.harness.peer_servers, whose model classes the servers import by name.
            env["PYTHONPATH"] = str(REPO_ROOT)
        return env

    def _argv(self) -> list[str]:
        a = self.args
        target = self.target
        model_file = latest_model_file(a.repository, a.model)
        if target.kind == "keel":
            return [*super()._argv(), "--ingress-user-config",
                    json.dumps({"cache": {"key_prefix": KEEL_KEY_PREFIX}})]
        if isinstance(target, PeerTarget) and target.kind == "kserve":
            return peer_servers.kserve_argv(self.venvs["kserve"], a.model, model_file, self.port,
                                     grpc_port=self.grpc_port, workers=target.workers)
        if target.kind == "mlserver":
            folder = peer_servers.write_mlserver_config(
                self.temp_dir / "mlserver", a.model, model_file, self.port,
                grpc_port=self.grpc_port, metrics_port=free_port(),
                max_batch_size=a.mlserver_max_batch_size,
                max_batch_time_s=a.mlserver_max_batch_time)
            return peer_servers.mlserver_argv(self.venvs["mlserver"], folder)
        return super()._argv()  # the FastAPI baseline

    def grpc_unavailable(self) -> str | None:
        """Why the server has no OIP gRPC endpoint to measure (None: it has one)."""
        if self.target.kind in ("kserve", "mlserver"):
            return None
        if self.target.kind == "keel":
            return keel_grpc_unavailable(self.args.config)
        return "no gRPC server (FastAPI/uvicorn serves HTTP only)"

    def grpc_target(self) -> str:
        """``host:port`` of its gRPC server: KServe's ``--grpc_port``, MLServer's
        ``grpc_port`` setting, or Keel's ``grpc_options.port`` (HAProxy's gRPC frontend)."""
        return f"127.0.0.1:{self.grpc_port}"

    def grpc_metadata(self) -> list[tuple[str, str]]:
        """Metadata on every call: Keel's application name (Serve's gRPC routing key;
        optional while the config has one application), none for the peers."""
        if self.target.kind != "keel":
            return []
        return [("application", keel_app_name(self.args.config))]

    def cpu_snapshot(self) -> dict[int, tuple[float, float]]:
        """pid -> (own CPU s, CPU s of its children that exited and were waited for), for
        every live process of the server (``Server`` remembers them all)."""
        self._remember_processes()
        snapshot: dict[int, tuple[float, float]] = {}
        for pid, proc in list(self._known.items()):
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                snapshot[pid] = (times.user + times.system,
                                 times.children_user + times.children_system)
        return snapshot


def _keel_config(config: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(config.read_text()) or {}
    return document


def keel_grpc_unavailable(config: Path) -> str | None:
    """Why Keel's config serves no gRPC (None when ``grpc_options`` names a servicer
    function: Serve then runs its gRPC server, behind HAProxy with HA proxy on)."""
    try:
        document = _keel_config(config)
    except (OSError, yaml.YAMLError) as exc:
        return f"cannot read {rel(config)}: {exc}"
    if grpc_port(document) is None:
        return f"{rel(config)} has no grpc_options.grpc_servicer_functions (no gRPC server)"
    return None


def keel_app_name(config: Path) -> str:
    applications = _keel_config(config).get("applications") or [{}]
    return str(applications[0].get("name", "default"))


def cpu_delta(before: dict[int, tuple[float, float]],
              after: dict[int, tuple[float, float]]) -> float:
    """CPU seconds the process tree spent between two snapshots: per process alive at the
    end, its own and its reaped children's time since the first snapshot (all of it for a
    process that started in between). A process that ended in between is counted through
    its parent's children time once reaped."""
    total = 0.0
    for pid, (own, children) in after.items():
        old_own, old_children = before.get(pid, (0.0, 0.0))
        total += max(0.0, own - old_own) + max(0.0, children - old_children)
    return total


def own_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


# --------------------------------------------------------------------------- points


@dataclass(frozen=True)
class Point:
    """One load point: concurrency, rows per request and how the rows are drawn."""

    name: str
    concurrency: int
    rows: int
    #: "unique": every row drawn anew (no cache hit possible); "zipf": rows drawn from a
    #: fixed pool by a Zipf law (a cache can hit).
    mix: str
    description: str
    #: "rest": OIP REST (``http_load``); "grpc": OIP gRPC ModelInfer (``grpc_load``).
    protocol: str = "rest"

    @property
    def rest_twin(self) -> str:
        """The REST point a gRPC point mirrors (its own name for a REST point)."""
        return self.name.removeprefix("grpc_")


POINTS: dict[str, Point] = {p.name: p for p in [
    Point("c1", 1, 1, "unique", "1 client, 1 new row per request"),
    Point("c8", 8, 1, "unique", "8 clients, 1 new row per request"),
    Point("c32", 32, 1, "unique", "32 clients, 1 new row per request"),
    Point("c8x64", 8, 64, "unique", "8 clients, 64 new rows per request"),
    Point("zipf_c8", 8, 1, "zipf", "8 clients, 1 row per request, rows repeating by a Zipf "
          "law over a fixed pool"),
    Point("zipf_c32", 32, 1, "zipf", "32 clients, the same mix"),
    Point("grpc_c1", 1, 1, "unique", "c1 over gRPC (ModelInfer, raw_input_contents)",
          "grpc"),
    Point("grpc_c8", 8, 1, "unique", "c8 over gRPC", "grpc"),
    Point("grpc_c32", 32, 1, "unique", "c32 over gRPC", "grpc"),
    Point("grpc_c8x64", 8, 64, "unique", "c8x64 over gRPC", "grpc"),
]}
DECIDE = "decide"
#: Names that stand for several points on the command line.
POINT_GROUPS: dict[str, list[str]] = {
    "rest": ["c1", "c8", "c32", "c8x64"],
    "grpc": ["grpc_c1", "grpc_c8", "grpc_c32", "grpc_c8x64"],
    "zipf": ["zipf_c8", "zipf_c32"],
}
POINT_CHOICES = [*POINTS, DECIDE, *POINT_GROUPS]
#: The default run: every point, then /v1/decide.
DEFAULT_POINTS = [*POINTS, DECIDE]
TITLES = {"c1": "c=1", "c8": "c=8", "c32": "c=32", "c8x64": "c=8, 64 rows",
          "zipf_c8": "Zipf c=8", "zipf_c32": "Zipf c=32"}
PROTOCOL_TITLES = {"rest": "OIP REST infer", "grpc": "OIP gRPC ModelInfer"}


def expand_points(names: list[str]) -> list[str]:
    """Point names with the groups replaced by their points, each once, in order."""
    expanded: list[str] = []
    for name in names:
        for point in POINT_GROUPS.get(name, [name]):
            if point not in expanded:
                expanded.append(point)
    return expanded
METRICS = ["rps", "rows_per_s", "p50_ms", "p95_ms", "p99_ms", "error_rate", "server_cores",
           "cpu_ms_per_request", "client_cores"]


def point_seed(args: argparse.Namespace, repeat: int, point: Point) -> int:
    """A seed per (run seed, repeat, point): every server of a repeat gets the same rows,
    and no point or repeat reuses another's (Redis keeps Keel's cache between servers)."""
    return (args.seed * 1_000_003 + repeat * 10_007 + zlib.crc32(point.name.encode())) % 2**63


def bodies_for(args: argparse.Namespace, repeat: int, point: Point) -> list[bytes]:
    """The point's request bodies, sent in order (shared sequence) by the workers; enough
    that the unique points do not wrap below ``--max-rps`` / ``--max-rows-per-s``."""
    seconds = args.warmup + args.duration + 1.0
    rate = args.max_rps if point.rows == 1 else args.max_rows_per_s / point.rows
    count = max(100, math.ceil(rate * seconds))
    seed = point_seed(args, repeat, point)
    if point.mix == "zipf":
        bodies, _ = make_zipf_bodies(count, args.zipf_pool, args.zipf_s, point.rows, seed=seed)
        return bodies
    return make_row_bodies(count, point.rows, seed=seed)


class BodyCache:
    """The bodies of the current repeat, made once and kept for every server of it: JSON
    bodies for a REST point, ``ModelInferRequest`` messages for a gRPC point (made from
    bodies of the same kind, drawn with the gRPC point's own seed: Keel's in-process cache
    layers outlive the Redis keys emptied between points, so no point repeats another's
    rows)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.repeat = 0
        self.bodies: dict[str, list[Any]] = {}

    def get(self, repeat: int, point: Point) -> list[Any]:
        if repeat != self.repeat:
            self.repeat, self.bodies = repeat, {}
        if point.name not in self.bodies:
            began = time.monotonic()
            bodies = bodies_for(self.args, repeat, point)
            self.bodies[point.name] = (grpc_load.requests_from_bodies(bodies, self.args.model)
                                       if point.protocol == "grpc" else bodies)
            log(f"  bodies of {point.name} (repeat {repeat}): {len(self.bodies[point.name])} "
                f"in {time.monotonic() - began:.1f} s")
        return self.bodies[point.name]


# --------------------------------------------------------------------------- answers


def outputs_of(answer: dict[str, Any]) -> dict[str, np.ndarray]:
    """An OIP answer's outputs, by name, as flat float64 arrays (shapes differ between
    servers: MLServer's NumpyCodec answers ``[n, 1]`` where the model returns ``[n]``)."""
    return {o["name"]: np.asarray(o["data"], dtype=np.float64).ravel()
            for o in answer.get("outputs", [])}


def compare(answer: dict[str, np.ndarray], expected: dict[str, np.ndarray]
            ) -> dict[str, Any]:
    """Whether every expected output is in ``answer`` and np.allclose to it."""
    common = [n for n in expected if n in answer]
    missing = [n for n in expected if n not in answer]
    diffs = {n: (float(np.max(np.abs(answer[n] - expected[n])))
                 if answer[n].shape == expected[n].shape else None) for n in common}
    match = bool(common) and not missing and all(
        answer[n].shape == expected[n].shape and np.allclose(answer[n], expected[n])
        for n in common)
    return {"match": match, "missing": missing, "max_abs_diff": diffs}


def reference_answer(args: argparse.Namespace, probe: bytes) -> dict[str, np.ndarray]:
    """What ONNX Runtime itself answers to the probe, here in the benchmark's process."""
    model_file = latest_model_file(args.repository, args.model)
    session = peer_servers.OnnxSession(model_file)
    item = json.loads(probe)["inputs"][0]
    features = np.asarray(item["data"], dtype=np.float32).reshape(item["shape"])
    return {name: np.asarray(value, dtype=np.float64).ravel()
            for (name, _), value in zip(session.outputs, session.run(features), strict=True)}


# --------------------------------------------------------------------------- runs


def keel_key_reset(server: Server, redis: Any) -> int | None:
    """Delete Keel's benchmark keys (None when there is no Redis to ask)."""
    if server.target.kind != "keel" or redis is None:
        return None
    try:
        deleted: int = delete_prefix(redis, KEEL_KEY_PREFIX)
    except Exception as exc:  # Redis down: Keel serves without it, and so does the bench
        log(f"  could not empty {KEEL_KEY_PREFIX}*: {exc}")
        return None
    return deleted


def measure_point(server: PeerServer, point: Point, bodies: list[Any],
                  args: argparse.Namespace) -> dict[str, Any]:
    """One point: the load (REST or gRPC), and the server's CPU over the measured
    window."""
    marks: dict[str, Any] = {}

    def window_opens() -> None:
        marks["cpu"] = server.cpu_snapshot()
        marks["client"] = own_cpu_seconds()
        marks["t"] = time.monotonic()

    timer = threading.Timer(args.warmup, window_opens)
    timer.start()
    try:
        if point.protocol == "grpc":
            result = asyncio.run(grpc_load.run_grpc_load(
                server.grpc_target(), point.concurrency, args.duration, args.warmup, bodies,
                args.request_timeout, model=args.model, channels=args.grpc_channels,
                shared_sequence=True, metadata=server.grpc_metadata()))
        else:
            result = asyncio.run(run_load(server.infer_url(), point.concurrency,
                                          args.duration, args.warmup, bodies,
                                          args.request_timeout, shared_sequence=True))
    finally:
        timer.cancel()
    if "t" not in marks:  # the load ended before the timer fired (a broken server)
        window_opens()
    wall = time.monotonic() - marks["t"]
    cpu = cpu_delta(marks["cpu"], server.cpu_snapshot())
    client = own_cpu_seconds() - marks["client"]
    row = result.to_dict()
    row.update({
        "point": point.name, "protocol": point.protocol, "rows_per_request": point.rows,
        "mix": point.mix,
        "rows_per_s": result.rps * point.rows,
        "server_cpu_s": round(cpu, 3), "cpu_wall_s": round(wall, 3),
        "server_cores": cpu / wall if wall > 0 else None,
        # All requests of the window and the drain (ok or not) did the work measured.
        "cpu_ms_per_request": (1000.0 * cpu / (result.requests + result.drained_requests)
                               if result.requests else None),
        "client_cores": client / wall if wall > 0 else None,
        "wrapped": point.mix == "unique" and result.bodies_sent > result.bodies_available,
    })
    return row


def kserve_worker_restarts(log_path: Path) -> int | None:
    """How often KServe's multi-process parent replaced a worker that missed its 5 s ping
    (it logs "Child process [pid] died"): on a loaded machine a worker may need longer than
    that just to import KServe, and is then killed and spawned again."""
    with contextlib.suppress(OSError):
        return log_path.read_text(errors="replace").count("] died")
    return None


def grpc_probe(server: PeerServer, probe: bytes, args: argparse.Namespace,
               expected: dict[str, np.ndarray], rest_answer: dict[str, np.ndarray]
               ) -> dict[str, Any]:
    """The 4-row probe over gRPC once the server answers it (retried for up to
    ``--grpc-ready-timeout`` s: behind HAProxy, Keel's gRPC backends come up after its
    HTTP ones), compared with ONNX Runtime's answer and the server's REST answer."""
    request = grpc_load.request_from_body(probe, args.model)
    began = time.monotonic()
    deadline = began + args.grpc_ready_timeout
    attempts = 0
    while True:
        server._check_alive()
        attempts += 1
        try:
            response = grpc_load.infer_once(server.grpc_target(), request,
                                            min(10.0, args.request_timeout),
                                            server.grpc_metadata())
            break
        except grpc.RpcError as exc:
            status, detail = grpc_load.describe_error(exc)
            if time.monotonic() > deadline:
                raise ServerFailed(f"{server.target.name}: gRPC ModelInfer on "
                                   f"{server.grpc_target()} answered {status} for "
                                   f"{args.grpc_ready_timeout:g} s ({attempts} tries): "
                                   f"{detail[:500]}") from exc
            time.sleep(0.5)
    answer = grpc_load.outputs_of(response)
    return {"target": server.grpc_target(), "ready_s": round(time.monotonic() - began, 2),
            "attempts": attempts,
            "answer": {k: v.tolist() for k, v in answer.items()},
            "agreement": {"reference": compare(answer, expected),
                          "rest": compare(answer, rest_answer)}}


def check_and_measure(server: PeerServer, run: dict[str, Any], args: argparse.Namespace,
                      points: list[Point], bodies: BodyCache, repeat: int, probe: bytes,
                      expected: dict[str, np.ndarray],
                      keel_answer: dict[str, np.ndarray] | None, redis: Any, label: str,
                      progress: Progress) -> None:
    """Check a ready server's answers (REST; gRPC when a gRPC point is asked for), then
    run the points."""
    answer = outputs_of(run["probe"]["probe_answer"])
    skipped: dict[str, str] = {}
    run["skipped_points"] = skipped
    run["agreement"] = {
        "reference": compare(answer, expected),
        "keel": compare(answer, keel_answer) if keel_answer is not None else None,
    }
    log(f"{label}: answer matches ONNX "
        f"Runtime: {run['agreement']['reference']['match']}, Keel: "
        f"{(run['agreement']['keel'] or {}).get('match', 'n/a')}")
    if not run["agreement"]["reference"]["match"] or (
            run["agreement"]["keel"] is not None and not run["agreement"]["keel"]["match"]):
        raise ServerFailed(f"{server.target.name}: the 4-row answer differs: {run['agreement']}")
    if any(p.protocol == "grpc" for p in points):
        reason = server.grpc_unavailable()
        if reason is None:
            run["ports"]["grpc"] = server.grpc_port
            try:
                run["grpc"] = grpc_probe(server, probe, args, expected, answer)
                agreement = run["grpc"]["agreement"]
                log(f"{label}: gRPC on {run['grpc']['target']} answers "
                    f"after {run['grpc']['ready_s']} s, matches ONNX Runtime: "
                    f"{agreement['reference']['match']}, its REST answer: "
                    f"{agreement['rest']['match']}")
                if not (agreement["reference"]["match"] and agreement["rest"]["match"]):
                    reason = f"the 4-row gRPC answer differs: {agreement}"
                    run["grpc"]["error"] = reason
            except ServerFailed as exc:
                reason = str(exc)
                run["grpc"] = {"target": server.grpc_target(), "error": reason}
            if reason is not None:
                server.failed = True
                log(f"{label}: gRPC FAILED, its gRPC points skipped: {reason[:500]}")
        else:
            run["grpc"] = {"unavailable": reason}
            log(f"{label}: gRPC points skipped: {reason}")
        if reason is not None:
            skipped.update({p.name: reason for p in points if p.protocol == "grpc"})
    for point in points:
        if point.name in skipped:
            continue
        progress.step(f"{label} {point.name}")
        point_bodies = bodies.get(repeat, point)
        deleted = keel_key_reset(server, redis)
        row = measure_point(server, point, point_bodies, args)
        row["keel_keys_deleted"] = deleted
        run["points"].append(row)
        log(f"{label} {point.name}: {row['rps']:.0f} req/s, "
            f"{row['rows_per_s']:.0f} rows/s, p95 {fmt(row['p95_ms'])} ms, errors "
            f"{row['errors']}, server {fmt(row['server_cores'], 2)} cores"
            + (" (rows wrapped)" if row["wrapped"] else ""))
        progress.advance(f"{label} {point.name}")
        check_point(server, row, label)
        check_stop()


def run_server(target: Target, repeat: int, args: argparse.Namespace, points: list[Point],
               bodies: BodyCache, probe: bytes, expected: dict[str, np.ndarray],
               keel_answer: dict[str, np.ndarray] | None, venvs: dict[str, Path],
               redis: Any, logs_dir: Path, progress: Progress) -> dict[str, Any]:
    """Start one server, check its answer, run the points, stop it and all it started."""
    run = new_run("server", target.name, repeat)
    log_path = logs_dir / f"{target.name}-r{repeat}.log"
    server = PeerServer(target, args, log_path, venvs)
    label = f"{target.name} r{repeat}"
    progress.step(f"{label} starting")
    with serving(server, run, logs_dir, label, probe=probe,
                 startup_timeout=args.startup_timeout,
                 on_stop=lambda: keel_key_reset(server, redis)):
        check_and_measure(server, run, args, points, bodies, repeat, probe, expected,
                          keel_answer, redis, label, progress)
    if target.kind == "kserve":
        run["kserve_worker_restarts"] = kserve_worker_restarts(log_path)
    for _ in range(len(points) - len(run["points"])):
        progress.advance(f"{label} skipped")
    return run


def decide_args(args: argparse.Namespace) -> argparse.Namespace:
    """The decide scenario's settings for the decide part: hit and miss, one entity per
    request."""
    argv = ["--workloads", *args.decide_workloads,
            "--concurrency", *map(str, args.decide_concurrency), "--batch", "0",
            "--duration", str(args.duration), "--warmup", str(args.warmup),
            "--repeats", str(args.repeats), "--model", args.model, "--seed", str(args.seed),
            "--repository", str(args.repository), "--config", str(args.config),
            "--request-timeout", str(args.request_timeout),
            "--startup-timeout", str(args.startup_timeout), "--out", str(args.out),
            *([] if args.dashboard else ["--no-dashboard"])]
    return decide_scenario.parse_args(argv)


# --------------------------------------------------------------------------- summary


def ratio_with_cpu(row: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``statistics.ratio`` (req/s, p50, p95, p99) plus rows/s and CPU ms per request."""
    found: dict[str, Any] = ratio(row, reference)
    for metric in ("rows_per_s", "cpu_ms_per_request"):
        found[metric] = (row[metric] / reference[metric]
                         if row.get(metric) and reference.get(metric) else None)
    return found


def grpc_ratios(medians: dict[str, dict[str, dict[str, Any]]], servers: list[str],
                points: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Keel over gRPC: ÷ Keel over REST per point (``keel_grpc/keel_rest``, keyed by the
    gRPC point), and ÷ the peer whose gRPC did the most rows/s at that point
    (``keel_grpc/best_peer_grpc``, the peer named)."""
    keel = medians.get("keel", {})
    vs_rest: dict[str, dict[str, Any]] = {}
    vs_best: dict[str, dict[str, Any]] = {}
    for name in points:
        point = POINTS[name]
        if point.protocol != "grpc" or name not in keel:
            continue
        if point.rest_twin in keel:
            vs_rest[name] = ratio_with_cpu(keel[name], keel[point.rest_twin])
        measured = {peer: medians[peer][name] for peer in PEERS
                    if peer in servers and name in medians.get(peer, {})
                    and medians[peer][name].get("rows_per_s")}
        if measured:
            best = max(measured, key=lambda peer: measured[peer]["rows_per_s"])
            vs_best[name] = {"peer": best, **ratio_with_cpu(keel[name], measured[best])}
    return {"keel_grpc/keel_rest": vs_rest, "keel_grpc/best_peer_grpc": vs_best}


def summarise(document: dict[str, Any]) -> dict[str, Any]:
    """Medians per (server, point) over the repeats; Keel's ratios to each peer, and of
    its gRPC to its REST and to the best peer's gRPC; the answer checks; the points
    each server skipped (no gRPC)."""
    servers = document["settings"]["servers"]
    points = [p for p in document["settings"]["points"] if p in POINTS]
    runs = document["runs"]
    medians = median_rows(runs, "server", servers, points, METRICS, point_key="point")
    for name in servers:
        for point, row in medians[name].items():
            found = [p for r in runs if r["server"] == name for p in r["points"]
                     if p["point"] == point]
            row["wrapped"] = any(p.get("wrapped") for p in found)
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    if "keel" in servers:
        for reference in REFERENCES:
            if reference not in servers:
                continue
            by_point = ratios_against(medians, "keel", reference)
            for point, row in by_point.items():
                keel, other = medians["keel"][point], medians[reference][point]
                row["cpu_ms_per_request"] = (
                    keel["cpu_ms_per_request"] / other["cpu_ms_per_request"]
                    if keel["cpu_ms_per_request"] and other["cpu_ms_per_request"] else None)
            ratios[f"keel/{reference}"] = by_point
    by_grpc = grpc_ratios(medians, servers, points) if "keel" in servers else {}
    agreement: dict[str, dict[str, Any]] = {}
    for name in servers:
        checked = [r["agreement"] for r in runs if r["server"] == name and "agreement" in r]
        keel_checks = [a["keel"] for a in checked if a.get("keel") is not None]
        grpc_checks = [r["grpc"]["agreement"] for r in runs
                       if r["server"] == name and "agreement" in r.get("grpc", {})]
        agreement[name] = {
            "runs": len(checked),
            "matches_reference": all(a["reference"]["match"] for a in checked) if checked
            else None,
            "matches_keel": all(k["match"] for k in keel_checks) if keel_checks else None,
            "max_abs_diff_vs_keel": max(
                (d for k in keel_checks for d in k["max_abs_diff"].values() if d is not None),
                default=None),
            "grpc_runs": len(grpc_checks),
            "grpc_matches_reference": all(g["reference"]["match"] for g in grpc_checks)
            if grpc_checks else None,
            "grpc_matches_rest": all(g["rest"]["match"] for g in grpc_checks)
            if grpc_checks else None,
        }
    skipped: dict[str, dict[str, str]] = {}
    for run in runs:
        for point, reason in run.get("skipped_points", {}).items():
            kind = "unavailable" if "unavailable" in run.get("grpc", {}) else "failed"
            skipped.setdefault(run["server"], {})[point] = f"{kind}: {reason}"
    return {"medians": medians, "ratios": ratios, "grpc_ratios": by_grpc,
            "agreement": agreement, "skipped": skipped}


def summarise_decide(decide: dict[str, Any]) -> dict[str, Any]:
    """The decide scenario's own medians, ratios and verdicts of the decide part."""
    dargs = argparse.Namespace(**decide["settings"])
    summary: dict[str, Any] = decide_scenario.summarise(
        decide["runs"], list(decide_scenario.SERVERS), decide_scenario.plan(dargs))
    return summary


def _compact(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:,.0f}"


def _cell_missing(document: dict[str, Any], server: str, point: str) -> str:
    """What a table shows for a point without medians: "n/a" where the server has no
    gRPC to measure, else "failed"."""
    reason = document.get("skipped", {}).get(server, {}).get(point, "")
    return "n/a" if reason.startswith("unavailable") else "failed"


def markdown(document: dict[str, Any]) -> str:
    """The medians as markdown tables: the headline (one per protocol), the details,
    Keel's ratios (to each peer; its gRPC to its REST and to the best peer's gRPC), the
    answer check, and the decide tables."""
    settings = document["settings"]
    servers = settings["servers"]
    points = [POINTS[p] for p in settings["points"] if p in POINTS]
    medians = document.get("medians", {})
    repeats = settings["repeats"]
    lines: list[str] = []
    if points:
        lines += [f"req/s (p95 ms), medians of {repeats} (the 64-row column: rows/s); "
                  f"{settings['duration']:g} s per point after {settings['warmup']:g} s of "
                  f"warm-up, {document['environment']['cpu_count']} CPUs shared by the "
                  "servers and the load generator"]
        for protocol, title in PROTOCOL_TITLES.items():
            chosen = [p for p in points if p.protocol == protocol]
            if not chosen:
                continue
            c8 = "c8" if protocol == "rest" else "grpc_c8"
            lines += ["", f"{title}:", "",
                      "| server | " + " | ".join(TITLES[p.rest_twin] for p in chosen)
                      + f" | server CPU at {TITLES['c8']} |",
                      "|---|" + "---:|" * (len(chosen) + 1)]
            for name in servers:
                cells = []
                for point in chosen:
                    row = medians.get(name, {}).get(point.name)
                    if row is None:
                        cells.append(_cell_missing(document, name, point.name))
                        continue
                    value = row["rows_per_s"] if point.rows > 1 else row["rps"]
                    unit = " rows/s" if point.rows > 1 else ""
                    cells.append(f"{_compact(value)}{unit} ({fmt(row['p95_ms'])})")
                c8_row = medians.get(name, {}).get(c8) or {}
                cpu = (f"{c8_row['server_cores']:.2f} cores, "
                       f"{c8_row['cpu_ms_per_request']:.2f} ms/req"
                       if c8_row.get("server_cores") is not None
                       and c8_row.get("cpu_ms_per_request") is not None else "-")
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {cpu} |")
        lines += ["", "| server | point | req/s | rows/s | p50 ms | p95 ms | p99 ms | errors | "
                  "server cores | server CPU ms/req | client cores |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in servers:
            for point in points:
                row = medians.get(name, {}).get(point.name)
                if row is None:
                    lines.append(f"| {name} | {point.name} | "
                                 f"{_cell_missing(document, name, point.name)} | | | | | | | | |")
                    continue
                mark = " (wrapped)" if row.get("wrapped") else ""
                lines.append(
                    f"| {name} | {point.name}{mark} | {fmt(row['rps'], 0)} | "
                    f"{fmt(row['rows_per_s'], 0)} | {fmt(row['p50_ms'])} | "
                    f"{fmt(row['p95_ms'])} | {fmt(row['p99_ms'])} | {row['errors']} | "
                    f"{fmt(row['server_cores'], 2)} | {fmt(row['cpu_ms_per_request'], 2)} | "
                    f"{fmt(row['client_cores'], 2)} |")
    if document.get("ratios"):
        lines += ["", "Keel ÷ peer (req/s above 1: Keel faster; latency and CPU per request "
                  "below 1: Keel better)", "",
                  *ratio_table(document["ratios"], point_head="point",
                               extra=("cpu_ms_per_request",))]
    by_grpc = document.get("grpc_ratios") or {}
    if any(by_grpc.values()):
        lines += ["", "Keel over gRPC ÷ Keel over REST (the same point), and ÷ the peer whose "
                  "gRPC did the most rows/s at that point", "",
                  "| ratio | point | over | req/s | rows/s | p50 | p95 | p99 | CPU ms/req |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for key, by_point in by_grpc.items():
            for point_name, row in by_point.items():
                lines.append(f"| {key} | {point_name} | {row.get('peer', 'keel REST')} | "
                             f"{fmt(row['rps'], 2)} | {fmt(row.get('rows_per_s'), 2)} | "
                             f"{fmt(row['p50_ms'], 2)} | {fmt(row['p95_ms'], 2)} | "
                             f"{fmt(row['p99_ms'], 2)} | {fmt(row['cpu_ms_per_request'], 2)} |")
    if any(check["runs"] for check in document.get("agreement", {}).values()):
        with_grpc = any(check.get("grpc_runs") for check in document["agreement"].values())
        grpc_head = " gRPC answer = ONNX Runtime's | gRPC = its REST |" if with_grpc else ""
        lines += ["", "| server | 4-row answer = ONNX Runtime's | = Keel's | max abs diff "
                  f"vs Keel |{grpc_head}",
                  "|---|---|---|---:|" + ("---|---|" if with_grpc else "")]
        flag = {True: "yes", False: "**no**", None: "-"}
        for name, check in document["agreement"].items():
            if not check["runs"]:
                continue
            diff = check["max_abs_diff_vs_keel"]
            grpc_cells = (f" {flag[check.get('grpc_matches_reference')]} | "
                          f"{flag[check.get('grpc_matches_rest')]} |" if with_grpc else "")
            lines.append(f"| {name} | {flag[check['matches_reference']]} | "
                         f"{'(itself)' if name == 'keel' else flag[check['matches_keel']]} | "
                         f"{'-' if diff is None else f'{diff:.2e}'} |{grpc_cells}")
    for name, reason in document.get("unavailable", {}).items():
        lines.append(f"\n{name}: not measured: {reason}")
    for name, by_point in document.get("skipped", {}).items():
        reasons = sorted(set(by_point.values()))
        lines.append(f"\n{name}: {', '.join(by_point)} not measured: {'; '.join(reasons)}")
    decide = document.get("decide")
    if decide and decide.get("medians"):
        dargs = argparse.Namespace(**decide["settings"])
        lines += ["", "`/v1/decide` (decide_scenario.py's servers and workloads, one entity per "
                  "request):", "",
                  decide_scenario.markdown(decide, list(decide_scenario.SERVERS),
                                           decide_scenario.plan(dargs))]
    return "\n".join(lines)


def plot(document: dict[str, Any], path: Path) -> None:
    """Median req/s and p95 per point, one bar per server (log scales); the gRPC points
    (``grpc_*``) beside the REST ones, hatched."""
    plt = pyplot()
    settings = document["settings"]
    servers = settings["servers"]
    points = [p for p in settings["points"] if p in POINTS]
    medians = document.get("medians", {})
    # Side by side for the REST points alone; one above the other when gRPC adds points.
    wide = len(points) > 6
    fig, (ax_rps, ax_p95) = plt.subplots(*((2, 1) if wide else (1, 2)),
                                         figsize=(max(13.0, 1.5 * len(points)), 9.0)
                                         if wide else (13, 4.8))
    width = 0.8 / max(1, len(servers))
    xs = np.arange(len(points))
    for i, name in enumerate(servers):
        rows = [medians.get(name, {}).get(p) or {} for p in points]
        offset = xs - 0.4 + width * (i + 0.5)
        for ax, metric in ((ax_rps, "rps"), (ax_p95, "p95_ms")):
            values = [r.get(metric) or float("nan") for r in rows]
            # Keel outlined, as serving_core draws Keel solid and the references dashed.
            bars = ax.bar(offset, values, width, label=name,
                          edgecolor="black" if name == "keel" else "none")
            color = bars.patches[0].get_facecolor() if bars.patches else None
            for bar, point in zip(bars.patches, points, strict=True):
                if POINTS[point].protocol == "grpc":
                    bar.set_hatch("//")
                    bar.set_edgecolor("black" if name == "keel" else "white")
                    if color is not None:
                        bar.set_facecolor(color)
    for ax, ylabel in ((ax_rps, "requests/s (median, log)"),
                       (ax_p95, "p95 latency, ms (median, log)")):
        ax.set_yscale("log")
        ax.set_xticks(xs, points)
        ax.set_xlabel("point (c: concurrent clients; x64: rows per request; zipf: "
                      "repeating rows; grpc_, hatched: OIP gRPC ModelInfer)", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", axis="y", alpha=0.3)
    if servers:
        ax_rps.legend(fontsize=8)
    protocols = " and ".join(PROTOCOL_TITLES[p] for p in PROTOCOL_TITLES
                             if any(POINTS[n].protocol == p for n in points)) or "OIP"
    save_figure(fig, path, f"{settings['model']}, {protocols}, "
                f"{document['environment']['cpu_count']} CPUs shared by server and load "
                f"generator, {settings['duration']:g} s per point, median of "
                f"{settings['repeats']}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = options.parser(
        "Keel vs KServe, MLServer and one FastAPI process: same model, same OIP REST and gRPC "
        "calls, same load generators, one run.",
        epilog="servers: " + "; ".join(f"{t.name}: {t.description}" for t in SERVERS.values())
        + ". points: " + "; ".join(f"{p.name}: {p.description}" for p in POINTS.values())
        + f"; {DECIDE}: /v1/decide, Keel vs baseline_decide (the decide scenario's machinery)"
        + ". point groups: " + "; ".join(f"{g}: {' '.join(n)}" for g, n in POINT_GROUPS.items()))
    parser.add_argument("--servers", nargs="+", default=DEFAULT_SERVERS, choices=list(SERVERS),
                        metavar="SERVER", help="which servers, in this order (each repeat)")
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS, choices=POINT_CHOICES,
                        metavar="POINT", help="which points, in this order (names or groups: "
                        "rest, grpc, zipf; e.g. `--points rest grpc`)")
    options.add_sweep(parser, concurrency=None, duration=8.0)
    parser.add_argument("--markdown", action="store_true",
                        help="print the tables of medians and ratios (markdown) at the end")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only redraw the PNG and print the markdown of a finished run")
    parser.add_argument("--zipf-s", type=float, default=1.1, help="exponent of the Zipf mix")
    parser.add_argument("--zipf-pool", type=int, default=2000,
                        help="distinct rows of the Zipf mix")
    parser.add_argument("--max-rps", type=float, default=5000.0,
                        help="one-row points get enough distinct bodies for this rate over "
                             "warm-up + duration (above it the rows wrap: marked in the JSON)")
    parser.add_argument("--max-rows-per-s", type=float, default=80000.0,
                        help="the same for the multi-row point, in rows/s")
    parser.add_argument("--mlserver-max-batch-size", type=int, default=32)
    parser.add_argument("--mlserver-max-batch-time", type=float, default=0.002,
                        help="MLServer's max_batch_time, s")
    parser.add_argument("--decide-workloads", nargs="+", default=["hit", "miss"],
                        choices=["hit", "miss", "zipf"])
    parser.add_argument("--decide-concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--venvs", type=Path, default=VENVS_DIR,
                        help="where the peers' venvs are made (and reused)")
    parser.add_argument("--venv-python",
                        default=getattr(sys, "_base_executable", sys.executable),
                        help="interpreter the peers' venvs are made with (default: the one "
                             "Keel's venv was made from)")
    parser.add_argument("--reinstall", action="store_true", help="make the peers' venvs anew")
    parser.add_argument("--grpc-channels", type=int, default=4,
                        help="gRPC channels (HTTP/2 connections) the workers of a gRPC point "
                             "share, at most one per worker")
    parser.add_argument("--grpc-ready-timeout", type=float, default=60.0,
                        help="s to wait, once a server answers REST, for its gRPC answer")
    options.add_servers(parser, repository="model repository of the peers (Keel reads the one "
                                           "in its config)",
                        config="Keel's serve config (its HTTP port and cache key prefix "
                               "replaced)")
    args = options.finish(parser, argv, concurrencies=("decide_concurrency", "grpc_channels"))
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be > 0 and --warmup >= 0")
    args.points = expand_points(args.points)
    return args


def prepare_venvs(args: argparse.Namespace, document: dict[str, Any]) -> dict[str, Path]:
    """Make (or reuse) the venv of every selected peer; a peer whose venv cannot be made
    is recorded as unavailable and skipped."""
    import onnxruntime

    specs = peer_servers.venvs(onnxruntime.__version__)
    wanted = sorted({t.venv for n in args.servers
                     if isinstance(t := SERVERS[n], PeerTarget) and t.venv})
    ready: dict[str, Path] = {}
    for name in wanted:
        root = args.venvs / name
        try:
            marker = peer_servers.ensure_venv(specs[name], root, args.venv_python,
                                              args.venvs / f"{name}-pip.log",
                                              reinstall=args.reinstall, log=log)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            reason = f"venv {rel(root)} could not be made: {exc}"
            log(reason)
            for server in args.servers:
                target = SERVERS[server]
                if isinstance(target, PeerTarget) and target.venv == name:
                    document["unavailable"][server] = reason
            continue
        document["environment"]["peer_venvs"][name] = {**marker, "path": rel(root)}
        ready[name] = root
    return ready


def _interrupt(signum: int, _frame: Any) -> None:
    STOP.set()
    raise KeyboardInterrupt(f"signal {signum}")


def render(path: Path) -> int:
    document = json.loads(path.read_text())
    plot(document, path.with_suffix(".png"))
    print(markdown(document))
    log(f"redrew {rel(path.with_suffix('.png'))}")
    return 0


def summarise_all(document: dict[str, Any]) -> dict[str, Any]:
    """``summarise``, and ``summarise_decide`` into the decide part once it has runs."""
    if document.get("decide", {}).get("runs"):
        document["decide"].update(summarise_decide(document["decide"]))
    return summarise(document)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        return render(args.render)
    signal.signal(signal.SIGTERM, _interrupt)
    if not (args.repository / args.model).is_dir():
        log(f"{args.repository / args.model} does not exist: run `.venv/bin/keel prepare` first")
        return 2
    points = [POINTS[p] for p in args.points if p in POINTS]
    with_decide = DECIDE in args.points and "keel" in args.servers
    json_path, logs_dir = stamped_paths(args.out, "peers", daily=True)
    logs_dir.mkdir(parents=True, exist_ok=True)
    document = RunDocument(
        json_path, args, summarise_all,
        servers={n: SERVERS[n].description for n in args.servers},
        points={p.name: dataclasses.asdict(p) for p in points},
        keel_key_prefix=KEEL_KEY_PREFIX,
        environment={**environment(), "peer_venvs": {}}, unavailable={})
    venvs = prepare_venvs(args, document.data)
    probe = make_row_bodies(1, 4, seed=args.seed)[0]
    expected = reference_answer(args, probe)
    document.data["probe"] = {"body": json.loads(probe),
                              "onnxruntime_answer": {k: v.tolist() for k, v in expected.items()}}
    redis: Any = None
    if "keel" in args.servers:
        try:
            redis = redis_client()
            redis.ping()
        except Exception as exc:
            log(f"no Redis ({exc}): Keel serves without its cache's remote tier; its "
                f"benchmark keys are not emptied")
            redis = None
    dargs: argparse.Namespace | None = None
    if with_decide:
        dargs = decide_args(args)
        document.data["decide"] = {"settings": settings_of(dargs),
                                   "servers": {n: t.description
                                               for n, t in decide_scenario.SERVERS.items()},
                                   "runs": []}
        if redis is None:
            document["decide"]["error"] = "no Redis: /v1/decide needs it"
            dargs = None
        else:
            decide_scenario.prepare(dargs)
    elif DECIDE in args.points:
        log("decide: skipped (it compares Keel with baseline_decide; keel is not in "
            "--servers)")
    install_fast_loop()
    bodies = BodyCache(args)
    servers = [n for n in args.servers if n not in document["unavailable"]] if points else []
    decide_points = len(decide_scenario.plan(dargs)) * len(decide_scenario.SERVERS) \
        if dargs is not None else 0

    def measure() -> None:
        keel_answer: dict[str, np.ndarray] | None = None
        total = args.repeats * (len(servers) * len(points) + decide_points)
        with Progress("peers", total) as progress:
            for repeat in range(1, args.repeats + 1):
                for name in servers:
                    check_stop()
                    run = run_server(SERVERS[name], repeat, args, points, bodies, probe,
                                     expected, keel_answer, venvs, redis, logs_dir, progress)
                    if name == "keel" and "probe" in run:
                        keel_answer = outputs_of(run["probe"]["probe_answer"])
                    document["runs"].append(run)
                    document.save()  # partial results survive an interrupted run
                if dargs is not None:
                    check_stop()
                    document["decide"]["runs"] += decide_scenario.run_repeat(
                        repeat, dargs, redis, list(decide_scenario.SERVERS),
                        decide_scenario.repeat_workloads(dargs, repeat), logs_dir, progress)
                    document.save()

    try:
        interrupted = run_interruptibly(measure)
    finally:
        if redis is not None:
            for prefix in (KEEL_KEY_PREFIX, *decide_scenario.KEY_PREFIXES.values()):
                with contextlib.suppress(Exception):
                    delete_prefix(redis, prefix)
    document.save()
    png_path = json_path.with_suffix(".png")
    try:
        plot(document.data, png_path)
        wrote = f"{rel(json_path)} and {rel(png_path)}"
    except ImportError as exc:  # matplotlib is in the `bench` extra
        wrote = rel(json_path)
        log(f"no PNG ({exc}): `pip install -e '.[bench]'`, then --render {rel(json_path)}")
    if args.markdown:
        print(markdown(document.data))
    log(f"wrote {wrote} in {document['elapsed_s']} s; server logs in {rel(logs_dir)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
