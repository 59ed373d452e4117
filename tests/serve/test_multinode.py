"""Keel on a Ray cluster of two nodes (head and worker, on this machine), losing one.

The scenario runs in tests/support/cluster_driver.py, in its own process with its own Ray
cluster (this pytest process already has a Ray instance, and ``ray.init`` happens
once per process); this test starts it, reads its JSON result, and always cleans up
every process it started, by process id, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import stop_group
from tests.support.serve_app import PROJECT_ROOT

pytestmark = pytest.mark.slow

DRIVER_TIMEOUT_S = 480


def test_keel_serves_through_the_loss_of_a_node(tmp_path: Path) -> None:
    # Short: Ray puts unix sockets under it (a socket path has at most 107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="kmn", dir="/tmp"))
    out = tmp_path / "result.json"
    log_path = tmp_path / "driver.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.cluster_driver", "--temp-dir", str(temp_dir),
             "--out", str(out)],
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            proc.wait(timeout=DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            leftovers = stop_group(proc, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
    tail = log_path.read_text(errors="replace")[-4000:]
    assert out.exists(), f"the driver wrote no result (rc {proc.returncode}):\n{tail}"
    result: dict[str, Any] = json.loads(out.read_text())
    print(f"\nmulti-node run in {time.monotonic() - started:.0f} s:\n"
          f"{json.dumps(result, indent=1)}")
    assert result["ok"], f"{result.get('error')}\n{tail}"
    assert not leftovers, f"processes outlived the driver: {leftovers}"

    # One model replica on each node, both taking requests, before the loss.
    assert sorted(p["node"] for p in result["placement_before"]) == ["head", "worker"]
    assert result["rows_by_node_before_kill"].get("head", 0) > 0
    assert result["rows_by_node_before_kill"].get("worker", 0) > 0
    # The node was declared dead, and the app kept answering on the head's replica.
    phases = result["phases"]
    assert phases["one_node"]["ok"] > 0
    # A client that retries a 503 once (as Retry-After asks) lost nothing.
    assert phases["total"]["failed_after_retry"] == 0, phases
    # Back to full strength on the new node, answering from it.
    running = [p for p in result["placement_after"] if p["state"] == "RUNNING"]
    assert sorted(p["node"] for p in running) == ["head", "new_worker"]
    assert result["rows_by_node_at_end"].get("new_worker", 0) > 0
    assert phases["recovered"]["ok"] > 0 and phases["recovered"]["failed_raw"] == 0
    assert result["wrong_answers"] == 0
