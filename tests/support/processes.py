"""Clusters a test starts in a process group of their own, found and stopped by process id
(never ``ray stop``: other clusters on the machine are not the test's)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def processes_naming(text: str) -> list[int]:
    """Process ids whose command line contains ``text`` (a run's own temp dir: every Ray
    process of that cluster names it, and so do its HAProxy and a restarted GCS)."""
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


def stop_group(proc: subprocess.Popen[bytes], temp_dir: Path) -> list[int]:
    """Stop ``proc`` (the leader of its own process group: SIGTERM, then SIGKILL), then
    anything of its cluster still running; returns the ids that had to be killed after."""
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
