"""The head's GCS killed and started again under load, with its state in Redis.

The scenario is ``bench.gcs_restart`` (its own Ray head from ``ray start --head`` with
KubeRay's GCS fault-tolerance settings and a private redis-server); this test runs it
shortened, in its own process group, reads its JSON and always stops every process it
started, by process (group) id, whatever happened. It never uses this session's shared Ray
instance.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.serve_app import PROJECT_ROOT

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 300


def processes_naming(text: str) -> list[int]:
    """Process ids whose command line contains ``text`` (the run's own temp dir: every
    Ray process of its cluster names it, and so do HAProxy and the restarted GCS)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def stop_run(proc: subprocess.Popen[bytes], temp_dir: Path) -> list[int]:
    """Stop the scenario (its own process group; it stops its cluster on SIGTERM), then
    anything of its cluster still running; returns the ids that had to be killed."""
    if proc.poll() is None:
        for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
    leftovers = processes_naming(str(temp_dir))
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def test_serve_answers_through_a_gcs_restart(tmp_path: Path) -> None:
    temp_dir = Path(tempfile.mkdtemp(prefix="kgt", dir="/tmp"))  # short: Ray's sockets
    out = tmp_path / "result.json"
    log_path = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.gcs_restart", "--json", str(out),
             "--temp-dir", str(temp_dir), "--rate", "20", "--before-s", "5",
             "--down-s", "5", "--after-s", "2", "--recover-timeout-s", "60",
             "--deploy-timeout-s", "120"],
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            leftovers = stop_run(proc, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
    tail = log_path.read_text(errors="replace")[-4000:]
    assert out.exists(), f"the scenario wrote no result (rc {proc.returncode}):\n{tail}"
    result: dict[str, Any] = json.loads(out.read_text())
    shown = ("phases", "control_plane_outage_s", "state_survived", "redeploy")
    print(f"\nGCS restart run in {time.monotonic() - started:.0f} s: "
          f"{json.dumps({k: result.get(k) for k in shown}, indent=1)}")
    assert result["ok"], f"{result.get('error')}\n{tail}"
    assert "recovery_error" not in result, result["recovery_error"]
    # (The scenario itself kills what its cluster leaves behind, e.g. HAProxy, which runs
    # in a session of its own: ``killed_at_stop``.)
    assert not leftovers, f"processes outlived the scenario: {leftovers}"

    phases = result["phases"]
    # Serve kept answering while the GCS was down and while it recovered.
    assert phases["gcs_down"]["ok"] > 0
    assert phases["total"]["errors"] == 0, phases["total"]
    # The same applications, deployments and replicas (no replica replaced) afterwards.
    assert result["state_survived"]["same_applications"]
    assert result["state_survived"]["same_replica_ids"]
    # A deploy after the restart works, new replica included.
    assert result["redeploy"]["status"] == 200 and "seconds" in result["redeploy"], \
        result["redeploy"]
