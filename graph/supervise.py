"""``keel serve``: ``serve run`` under a supervisor that ends every process it started.

Stopped by signal, ``serve run`` shuts its local Ray instance down, but a process that a
Ray worker started itself outlives it: Ray Serve's HAProxy (a child of the proxy actor)
was found still holding ports 8000, 9000, 9101 and 8404 after the demo had stopped, and
the next start failed to bind. The supervisor runs the command in a session of its own,
keeps a list of every process that descends from it (polled, so that one orphaned later
is still known), and when the command ends or the supervisor gets SIGINT/SIGTERM, it asks
the command to stop (SIGTERM), waits ``grace_s``, then SIGKILLs whatever is left of the
list. Nothing else is touched (no ``ray stop``: other Ray instances on the machine live).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


class Supervisor:
    """One command and every process it starts, ended together."""

    def __init__(self, argv: Sequence[str], *, poll_s: float = 0.5, grace_s: float = 15.0,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        #: Every descendant seen so far, by pid, with its start time (a pid reused by an
        #: unrelated process later has another start time and is left alone).
        self.seen: dict[int, float] = {}
        self._stopping = threading.Event()

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, start_new_session=True, env=self.env)
        self._remember()
        threading.Thread(target=self._watch, name="keel-supervise", daemon=True).start()

    def _remember(self) -> None:
        """Add every process whose parent is the command or a process already on the list
        (one scan of the process table; a known process reparented to init keeps its
        children known, since they are found through it)."""
        assert self.process is not None
        if self.process.pid not in self.seen:
            with contextlib.suppress(psutil.Error):
                self.seen[self.process.pid] = psutil.Process(self.process.pid).create_time()
        children: dict[int, list[psutil.Process]] = {}
        started: dict[int, float] = {}
        for proc in psutil.process_iter(["ppid", "create_time"]):
            children.setdefault(proc.info["ppid"], []).append(proc)
            started[proc.pid] = proc.info["create_time"]
        # Only a listed process still running as itself (not a reused pid) has children.
        frontier = [pid for pid, created in self.seen.items() if started.get(pid) == created]
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child.pid not in self.seen:
                    self.seen[child.pid] = started[child.pid]
                    frontier.append(child.pid)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            self._remember()
            self._stopping.wait(self.poll_s)

    def alive(self) -> list[psutil.Process]:
        """The processes of the list still running (and still the ones that were seen)."""
        out = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                continue
        return out

    def wait(self) -> int:
        """Run until the command ends or a signal arrives; then end everything."""
        assert self.process is not None
        received: list[int] = []

        def on_signal(signum: int, frame: object) -> None:
            received.append(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.process.poll() is None and not received:
                time.sleep(0.2)
            if received:
                log.info("keel serve: %s received, stopping", signal.Signals(received[0]).name)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.stop()
        return self.process.returncode if self.process.returncode is not None else 1

    def stop(self) -> None:
        """SIGTERM to the command, ``grace_s`` for it and its processes to go, then SIGKILL
        to every process of the list still running."""
        assert self.process is not None
        if self.process.poll() is None:
            self._remember()
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._stopping.set()
                # What the command left behind gets a SIGTERM of its own, then a moment.
                for proc in self.alive():
                    with contextlib.suppress(psutil.Error):
                        proc.terminate()
                psutil.wait_procs(self.alive(), timeout=max(0.0, deadline - time.monotonic()))
                break
            time.sleep(0.1)
        self._stopping.set()
        left = self.alive()
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if left:
            log.warning("keel serve: killed %d processes left after %.0f s: %s", len(left),
                        self.grace_s, ", ".join(f"{p.pid}" for p in left))
        psutil.wait_procs(left, timeout=5)
        if self.process.poll() is None:
            self.process.wait(timeout=5)


def serve(config: str, *, grace_s: float = 15.0) -> int:
    """``serve run <config>`` (the venv's ``serve`` beside this Python), supervised."""
    serve_bin = Path(sys.executable).parent / "serve"
    command = [str(serve_bin) if serve_bin.exists() else "serve", "run", config]
    # With Ray's HAProxy on (make demo), HAProxy without splice(): a client that goes away
    # then cancels its request (graph/haproxy_nosplice.py).
    from graph.haproxy_nosplice import without_splice

    supervisor = Supervisor(command, grace_s=grace_s, env=without_splice(dict(os.environ)))
    supervisor.start()
    return supervisor.wait()
