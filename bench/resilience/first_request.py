"""Warm before ready: how fast Keel answers the first requests sent the moment
``GET /v2/health/ready`` turns 200.

Keel's readiness must turn 200 only once every hop is warm (the Ingress calls each
downstream deployment in the background at start-up and answers 503 with
``"warming": true`` until that is done), so that the first ``/v1/decide`` is as fast as
the next ones (target: 50 ms or less; before the warm-up it took 0.5-6.6 s).

Each run starts Keel as ``make demo`` runs it (serving_core's ``keel_haproxy`` target:
``harness.keel_server``, i.e. ``serve run serve_config.yaml`` with
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1`` in a private local Ray
instance, the HTTP port served by HAProxy), polls ``GET /v2/health/ready`` every 20 ms
(nothing else is sent before it answers 200; ``Server.wait_ready`` would send
inferences, so it is not used), and the moment it answers 200 sends, one after the
other, each on a new connection:

    a. POST /v1/decide        risk_mlp,  SYM001/ACC0042
    b. POST /v1/decide        risk_gbdt, SYM017/ACC0123
    c. POST /v2/models/risk_gbdt/infer  one FP32 row [1, 12] (new each run)
    d. POST /v1/decide        risk_mlp,  SYM033/ACC0187

then stops the whole server tree (``Server.stop``; never ``ray stop``).
Besides the ports, three things differ from ``make demo``, all for measuring: the
prediction cache's key prefix (``keelbench:first:``, emptied before and after every run,
so no run finds the previous one's predictions in Redis), private ports for Serve's
fallback proxy (see FirstRequestServer) and unbuffered replica logs
(``harness.servers.UNBUFFERED_LOGS``).

    .venv/bin/python -m bench.resilience.first_request --markdown            # 3 runs, ~4-6 min
    .venv/bin/python -m bench.resilience.first_request --runs 1 --out /tmp/first.json

Writes the JSON and a PNG beside it (each request's latency per run, and the time to
readiness).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import random
import re
import shutil
import sys
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness.cache_keys import empty_prefix
from bench.harness.progress import Progress, log
from bench.harness.report import (
    REPO_ROOT,
    RESULTS_DIR,
    RunDocument,
    environment,
    fmt,
    interrupt_on_sigterm,
    pyplot,
    rel,
    run_interruptibly,
    save_figure,
)
from bench.harness.servers import (
    TARGETS,
    Server,
    ServerFailed,
    Target,
    serving,
    unbuffered_logs,
)
from bench.harness.statistics import median_or_none

TARGET = TARGETS["keel_haproxy"]
KEY_PREFIX = "keelbench:first:"
TARGET_MS = 50.0
POLL_INTERVAL_S = 0.02
WARM_LINE = "downstream hops warmed up in"


def _entity(symbol: str, account: str) -> dict[str, str]:
    return {"symbol": symbol, "account_id": account}


#: (key, label, path): the requests sent once readiness is 200, in this order.
REQUESTS: list[tuple[str, str, str]] = [
    ("a_decide_mlp", "a. decide risk_mlp (1st)", "/v1/decide"),
    ("b_decide_gbdt", "b. decide risk_gbdt", "/v1/decide"),
    ("c_infer_gbdt", "c. infer risk_gbdt [1, 12]", "/v2/models/risk_gbdt/infer"),
    ("d_decide_mlp", "d. decide risk_mlp (2nd)", "/v1/decide"),
]


def request_bodies(run: int, seed: int) -> dict[str, bytes]:
    """The four bodies of one run; the infer row is new every run."""
    rng = random.Random(seed + run)
    row = [round(rng.gauss(0.0, 1.0), 6) for _ in range(12)]
    documents: dict[str, Any] = {
        "a_decide_mlp": {"model": "risk_mlp", "entities": [_entity("SYM001", "ACC0042")]},
        "b_decide_gbdt": {"model": "risk_gbdt", "entities": [_entity("SYM017", "ACC0123")]},
        "c_infer_gbdt": {"inputs": [{"name": "features", "shape": [1, 12],
                                     "datatype": "FP32", "data": row}]},
        "d_decide_mlp": {"model": "risk_mlp", "entities": [_entity("SYM033", "ACC0187")]},
    }
    return {k: json.dumps(v, separators=(",", ":")).encode() for k, v in documents.items()}


# --------------------------------------------------------------------------- HTTP


def call(url: str, body: bytes | None = None,
         timeout: float = 30.0) -> tuple[int, dict[str, str], str, float]:
    """One request on a new connection: status, headers, body, ms from sending to the
    last byte read. Raises OSError (refused, reset, timeout)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        started = time.perf_counter()
        if body is None:
            conn.request("GET", parts.path)
        else:
            conn.request("POST", parts.path, body=body,
                         headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
        ms = (time.perf_counter() - started) * 1000.0
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, text, ms
    except http.client.HTTPException as exc:
        raise OSError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------- server


def target(args: argparse.Namespace) -> Target:
    """``keel_haproxy``, with replica logs written at once unless ``--buffered-logs``."""
    # Unbuffered, so the Ingress's warm-up line and access log lines can be read
    # (``--buffered-logs`` keeps Ray's buffer, as `make demo`).
    return TARGET if args.buffered_logs else unbuffered_logs(TARGET)


class FirstRequestServer(Server):
    """A ``Server`` (private ports, Serve's fallback proxy included) with the
    Ingress's cache under this benchmark's key prefix."""

    def _argv(self) -> list[str]:
        return [*super()._argv(), "--ingress-user-config",
                json.dumps({"cache": {"key_prefix": KEY_PREFIX}})]


def repository_models(repository: Path) -> set[str]:
    return {p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")}


def wait_ready(server: Server, began: float, timeout_s: float,
               models: set[str]) -> dict[str, Any]:
    """Poll ``/v2/health/ready`` every 20 ms until it answers 200; what came before.

    A 200 that names a model not in ``models`` comes from another Keel on the machine
    (see FirstRequestServer): counted as ``200-foreign`` and polling goes on."""
    url = f"http://127.0.0.1:{server.port}/v2/health/ready"
    statuses: Counter[str] = Counter()
    warming: Counter[str] = Counter()
    refused = 0
    first_answer_s: float | None = None
    first_503_s: float | None = None
    samples: list[dict[str, Any]] = []
    last_sample: dict[str, Any] | None = None
    last_seen = 0.0
    last = "no answer"
    # Each change of outcome (a status, or a connection error's type): when, and how
    # many times the previous outcome was seen in a row.
    timeline: list[dict[str, Any]] = []

    def note(outcome: str) -> None:
        at = round(time.monotonic() - began, 3)
        if timeline and timeline[-1]["outcome"] == outcome:
            timeline[-1]["count"] += 1
            timeline[-1]["until_s"] = at
        else:
            timeline.append({"outcome": outcome, "from_s": at, "until_s": at, "count": 1})

    while True:
        now = time.monotonic()
        if now - last_seen > 1.0:
            server._check_alive()
            server._remember_processes()
            last_seen = now
        try:
            # Readiness waits up to ready_timeout_s (2 s) for the warm-up, then up to as
            # long for the models' status; a longer wait is HAProxy holding the request.
            status, _, text, ms = call(url, timeout=5.0)
        except OSError as exc:
            refused += 1
            last = f"{type(exc).__name__}: {exc}"
            note(type(exc).__name__)
        else:
            at = time.monotonic() - began
            document = _json(text)
            named = set((document or {}).get("models", {})) if isinstance(document, dict) \
                else set()
            outcome = "200-foreign" if status == 200 and not named <= models else str(status)
            note(outcome)
            if first_answer_s is None:
                first_answer_s = at
            if outcome == "200":
                return {"ready_s": round(at, 3), "ready_wall": time.time(),
                        "ready_poll_ms": round(ms, 2), "ready_body": _json(text) or text[:2000],
                        "first_answer_s": round(first_answer_s, 3),
                        "first_503_s": None if first_503_s is None else round(first_503_s, 3),
                        "answers_before": dict(statuses), "answers_503": statuses.get("503", 0),
                        "warming_503": dict(warming), "connection_errors": refused,
                        "timeline": timeline, "first_of_each_status": samples,
                        "last_before_ready": last_sample}
            statuses[outcome] += 1
            if status == 503:
                if first_503_s is None:
                    first_503_s = at
                flag = document.get("warming") if isinstance(document, dict) else None
                warming["absent" if flag is None else str(flag).lower()] += 1
            last = f"{outcome} {text[:300]}"
            # The first answer of each status, and the last one before 200.
            last_sample = {"at_s": round(at, 3), "status": outcome, "ms": round(ms, 1),
                           "body": document if document is not None else text[:500]}
            if statuses[outcome] == 1:
                samples.append(last_sample)
        if time.monotonic() - began > timeout_s:
            raise ServerFailed(f"{url} not ready after {timeout_s} s (last: {last})")
        time.sleep(POLL_INTERVAL_S)


def send_requests(server: Server, bodies: dict[str, bytes]) -> dict[str, Any]:
    """Requests a-d, one after the other; each one's latency, status and Keel's view."""
    answers: dict[str, Any] = {}
    for key, _, path in REQUESTS:
        sent_wall = time.time()
        try:
            status, headers, text, ms = call(f"http://127.0.0.1:{server.port}{path}",
                                             bodies[key])
        except OSError as exc:
            answers[key] = {"status": None, "ms": None, "error": f"{type(exc).__name__}: {exc}",
                            "sent_wall": sent_wall}
            continue
        document = _json(text)
        answer: dict[str, Any] = {"status": status, "ms": round(ms, 2), "sent_wall": sent_wall,
                                  "x_keel_cache": headers.get("x-keel-cache")}
        if isinstance(document, dict) and status == 200:
            if "timings_ms" in document:
                answer["timings_ms"] = document["timings_ms"]
            if "results" in document:
                answer["row_cache"] = [r.get("cache") for r in document["results"]]
            answer["model_version"] = document.get("model_version")
        else:
            answer["body"] = document if document is not None else text[:1000]
        answers[key] = answer
    return answers


# --------------------------------------------------------------------------- Ray's logs

_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
#: Serve's access log line: "POST / 200 12.3ms" (the route is the app's prefix).
_ACCESS = re.compile(r" -- (GET|POST) (\S+) (\d{3}) ([\d.]+)ms")


def _wall(line: str) -> float | None:
    match = _STAMP.search(line)
    if match is None:
        return None
    return dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def ingress_logs(server: Server, ready_wall: float | None, keep: Path) -> list[dict[str, Any]]:
    """Per Ingress replica: its warm-up line (and when, relative to readiness), the lines
    of requests a-d and how many readiness checks it answered; copies the logs."""
    replicas = []
    for path in server.ray_logs("serve/replica_*Ingress*.log"):
        with contextlib.suppress(OSError):
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, keep / path.name)
        lines = path.read_text(errors="replace").splitlines()
        warm = [ln for ln in lines if WARM_LINE in ln]
        warm_wall = _wall(warm[0]) if warm else None
        replicas.append({
            "log": path.name,
            "log_bytes": path.stat().st_size,
            "warm_up": [ln.strip()[-300:] for ln in warm],
            "warm_done_before_ready_s": (round(ready_wall - warm_wall, 3)
                                         if ready_wall and warm_wall else None),
            "warm_up_failures": [ln.strip()[-300:] for ln in lines if "warm-up call failed" in ln],
            # The POSTs are requests a-d (readiness is a GET).
            "post_lines": [ln.strip()[-200:] for ln in lines
                           if (m := _ACCESS.search(ln)) and m.group(1) == "POST"][:20],
            "get_lines": [ln.strip()[-200:] for ln in lines
                          if (m := _ACCESS.search(ln)) and m.group(1) == "GET"][-10:],
        })
    return replicas


# --------------------------------------------------------------------------- runs


def one_run(run: int, args: argparse.Namespace, logs_dir: Path) -> dict[str, Any]:
    """Start Keel, wait for readiness, send a-d, stop everything."""
    result: dict[str, Any] = {"run": run,
                              "started_at": dt.datetime.now().isoformat(timespec="seconds")}
    server = FirstRequestServer(target(args), args, logs_dir / f"keel-r{run}.log")
    result["cache_keys_deleted_before"] = empty_prefix(KEY_PREFIX)
    ready: dict[str, Any] = {}

    def keep_ingress_logs() -> None:  # before the server's temp dir goes
        result["ingress_replicas"] = ingress_logs(server, ready.get("ready_wall"),
                                                  logs_dir / f"r{run}-ray")

    with serving(server, result, logs_dir, f"run {run}", probe=None,
                 startup_timeout=args.startup_timeout, on_stop=keep_ingress_logs):
        ready = wait_ready(server, time.monotonic(), args.startup_timeout,
                           repository_models(args.repository))
        result["requests"] = send_requests(server, request_bodies(run, args.seed))
        result["readiness"] = ready
        server._remember_processes()
        summary = ", ".join(f"{k[0]} {a['status']} {a['ms']} ms"
                            for k, a in result["requests"].items())
        log(f"run {run}: ready in {ready['ready_s']} s after "
            f"{ready['answers_503']} x 503 ({ready['warming_503']}); {summary}")
    result["cache_keys_deleted_after"] = empty_prefix(KEY_PREFIX)
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and max over the runs per request, and of the readiness figures."""
    rows: dict[str, Any] = {}
    for key, label, _ in REQUESTS:
        answers = [r["requests"][key] for r in runs if "requests" in r]
        ms = [a["ms"] for a in answers if a.get("ms") is not None]
        rows[key] = {"label": label, "n": len(answers),
                     "median_ms": _rounded(median_or_none(ms), 2),
                     "max_ms": round(max(ms), 2) if ms else None,
                     "statuses": dict(Counter(str(a.get("status")) for a in answers)),
                     "over_target": sum(m > TARGET_MS for m in ms)}
    ready = [r["readiness"] for r in runs if "readiness" in r]

    def med_max(values: list[float]) -> dict[str, float | None]:
        return {"median": _rounded(median_or_none(values), 3),
                "max": round(max(values), 3) if values else None}

    return {"requests": rows, "ready_s": med_max([r["ready_s"] for r in ready]),
            "answers_503": med_max([r["answers_503"] for r in ready]),
            "failed_runs": sum("error" in r for r in runs), "target_ms": TARGET_MS}


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def plot(document: dict[str, Any], path: Path) -> None:
    """Per run: each request's latency (bars, log scale) and the time to readiness."""
    runs = [r for r in document["runs"] if "requests" in r]
    plt = pyplot()
    fig, (ax_ms, ax_ready) = plt.subplots(1, 2, figsize=(12, 4.5),
                                          gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        values = [run["requests"][key].get("ms") or float("nan") for key, _, _ in REQUESTS]
        ax_ms.bar([k - 0.4 + width * (i + 0.5) for k in range(len(REQUESTS))], values, width,
                  label=f"run {run['run']}")
    ax_ms.axhline(TARGET_MS, color="grey", linestyle=":", label=f"target {TARGET_MS:g} ms")
    ax_ms.set_xticks(range(len(REQUESTS)), [label for _, label, _ in REQUESTS], fontsize=8)
    ax_ms.set_yscale("log")
    ax_ms.set_ylabel("ms from sending to the last byte (log)")
    ax_ms.grid(True, axis="y", which="both", alpha=0.3)
    if runs:
        ax_ms.legend(fontsize=8)
    ax_ready.bar([str(r["run"]) for r in runs], [r["readiness"]["ready_s"] for r in runs])
    ax_ready.set_xlabel("run")
    ax_ready.set_ylabel("start -> ready, s")
    ax_ready.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path, "Keel's first requests the moment /v2/health/ready turns 200 "
                f"({document['target']['name']})")


def markdown(summary: dict[str, Any], runs: int) -> str:
    lines = [f"| first requests after ready (n = {runs}) | median ms | max ms | statuses "
             f"| over {TARGET_MS:g} ms |", "|---|---:|---:|---|---:|"]
    for row in summary["requests"].values():
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(row["statuses"].items()))
        lines.append(f"| {row['label']} | {fmt(row['median_ms'])} | {fmt(row['max_ms'])} | "
                     f"{statuses or '-'} | {row['over_target']} |")
    ready, n503 = summary["ready_s"], summary["answers_503"]
    lines += [f"| start -> ready (s) | {fmt(ready['median'])} | {fmt(ready['max'])} | | |",
              f"| 503 readiness answers before 200 | {fmt(n503['median'], 0)} | "
              f"{fmt(n503['max'], 0)} | | |"]
    if summary["failed_runs"]:
        lines.append(f"\n{summary['failed_runs']} run(s) failed: see the JSON.")
    return "\n".join(lines)


def default_out() -> Path:
    path = RESULTS_DIR / f"{dt.date.today():%Y-%m-%d}-first-request.json"
    if path.exists():
        path = path.with_name(f"{dt.datetime.now():%Y-%m-%d-%H%M%S}-first-request.json")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Keel's first requests the moment /v2/health/ready turns 200.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="Keel start-ups")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON (default: bench/results/<date>-first-request.json); "
                             "server and Ingress logs go to <out without .json>-logs/")
    parser.add_argument("--markdown", action="store_true", help="print the table on stdout")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "serve_config.yaml",
                        help="Keel's serve config (ports and cache key prefix replaced)")
    parser.add_argument("--startup-timeout", type=float, default=300.0,
                        help="s to wait for readiness per run")
    parser.add_argument("--buffered-logs", action="store_true",
                        help="keep Ray's in-memory buffer of replica log records (as `make "
                             "demo`); the Ingress's log file then stays empty")
    parser.add_argument("--seed", type=int, default=20240611, help="of the infer rows")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    args.out = (args.out or default_out()).resolve()
    args.config = args.config.resolve()
    # What a Server reads.
    args.dashboard = True  # as `serve run` does
    args.model = "risk_mlp"
    args.repository = REPO_ROOT / "models"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.repository / "risk_gbdt").is_dir():
        log(f"{args.repository} has no demo models: run `.venv/bin/keel prepare` first")
        return 2
    interrupt_on_sigterm()  # stop the server on SIGTERM too
    logs_dir = args.out.with_name(args.out.name.removesuffix(".json") + "-logs")
    logs_dir.mkdir(parents=True, exist_ok=True)
    document = RunDocument(
        args.out,
        {"runs": args.runs, "poll_interval_s": POLL_INTERVAL_S,
         "startup_timeout_s": args.startup_timeout, "seed": args.seed,
         "requests": [{"key": k, "label": lb, "path": p} for k, lb, p in REQUESTS]},
        lambda d: {"summary": summarise(d["runs"])},
        target={"name": TARGET.name, "description": target(args).description,
                "env": target(args).env, "config": rel(args.config),
                "cache_key_prefix": KEY_PREFIX},
        environment=environment())

    def measure() -> None:
        with Progress("first_request", args.runs, unit="runs") as progress:
            for run in range(1, args.runs + 1):
                progress.step(f"run {run}: start, readiness, a-d")
                document["runs"].append(one_run(run, args, logs_dir))
                document.save()
                progress.advance(f"run {run}")

    interrupted = run_interruptibly(measure)
    document.data["load_average_end"] = list(os.getloadavg())
    document.save()
    png_path = args.out.with_suffix(".png")
    plot(document.data, png_path)
    if args.markdown:
        print(markdown(document["summary"], len(document["runs"])))
    log(f"wrote {rel(args.out)} and {rel(png_path)}; logs in {rel(logs_dir)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
