"""Run the fault-injection tests and print their figures as a markdown table.

    .venv/bin/python -m bench.resilience.fault_table            # ~5 min on 2 cores
    .venv/bin/python -m bench.resilience.fault_table --json out.jsonl

Runs ``tests/serve/test_faults.py`` (each test appends one JSON line per fault to
``$KEEL_FAULT_REPORT``) and the Redis-cache fault that ``tests/serve/test_decide.py``
already covers. That test records nothing itself: its row is read from its outcome
(it sends 40 requests while the cache's Redis is stopped and asserts every one is 200).
Writes ``<out>/<timestamp>-faults.json`` (the rows and pytest's status) and ``.png``
(requests accepted and failed per fault, and the recovery time). Exits with pytest's
status.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from bench.harness.progress import Progress, log
from bench.harness.report import REPO_ROOT as ROOT
from bench.harness.report import RESULTS_DIR, RunDocument, plot_bars, rel, stamped_paths

REDIS_TEST = ("tests/serve/test_decide.py::"
              "test_redis_stopped_mid_run_loses_no_request_and_the_cache_resumes")
REDIS_REQUESTS = 40  # what that test sends while Redis is down


def redis_row(junit: Path) -> dict[str, Any] | None:
    """The Redis test's row from pytest's JUnit XML; ``None`` if it did not run."""
    name = REDIS_TEST.rsplit("::", 1)[1]
    for case in ET.parse(junit).iter("testcase"):
        if case.get("name") != name:
            continue
        failed = any(child.tag in ("failure", "error") for child in case)
        return {"fault": "prediction-cache Redis stopped, then restarted",
                "accepted": None if failed else REDIS_REQUESTS,
                "failed": None if failed else 0, "recovery_s": None,
                "note": "test failed" if failed else
                "from test_decide.py (40 mixed /v2 + /v1/decide, all asserted 200)"}
    return None


def table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return "—" if value is None else str(value)

    lines = ["| fault | accepted | failed | failed statuses | recovery s | note |",
             "|---|---:|---:|---|---:|---|"]
    for row in rows:
        statuses = row.get("failed_statuses") or {}
        lines.append("| " + " | ".join([
            row["fault"], cell(row.get("accepted")), cell(row.get("failed")),
            ", ".join(f"{k}: {v}" for k, v in statuses.items()) or "—",
            cell(row.get("recovery_s")), row.get("note", "")]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Requests accepted and failed per fault (and the recovery time, s)."""
    names = [row["fault"][:28] for row in rows]
    plot_bars(names, {key: [row.get(key) for row in rows]
                      for key in ("accepted", "failed", "recovery_s")},
              path, "Fault injection: requests accepted and failed, recovery s",
              ylabel="requests (recovery: s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--json", type=Path, help="also keep the JSON lines here")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="where the JSON document and the PNG go")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", "tests/serve/test_faults.py", REDIS_TEST]
        env = {**os.environ, "KEEL_FAULT_REPORT": str(report)}
        with Progress("fault_table", 1, unit="pytest runs") as progress:
            progress.step("tests/serve/test_faults.py + the Redis test")
            status = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
            progress.advance(f"pytest exited with {status}")
        rows = ([json.loads(line) for line in report.read_text().splitlines() if line]
                if report.exists() else [])
        extra = redis_row(junit) if junit.exists() else None
        if extra is not None:
            rows.append(extra)
        if args.json:
            args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    json_path, _ = stamped_paths(args.out.resolve(), "faults")
    document = RunDocument(json_path, args, pytest_status=status, runs=rows)
    document.save()
    plot(rows, json_path.with_suffix(".png"))
    print()
    print(table(rows))
    log(f"wrote {rel(json_path)} and {rel(json_path.with_suffix('.png'))}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
