"""A private, restartable PgBouncer on its own port, in front of the machine's PostgreSQL.

The pool settings are the ones ``keel render-k8s`` deploys (:data:`graph.kube.
PGBOUNCER_POOL_SETTINGS`: session pooling, ``options`` ignored); only the addresses and
the authentication differ (trust here, as the machine's PostgreSQL; SCRAM on Kubernetes).
Debian's ``pgbouncer`` package provides the binary (.ci/run installs it). PgBouncer refuses
to run as root: as root it is started with ``-u`` (postgres, else nobody) and reads its
configuration before it drops privileges.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from graph.kube import PGBOUNCER_POOL_SETTINGS, pgbouncer_ini
from tests.support.redisserver import free_port

#: The machine's PostgreSQL (trust authentication); tests connect as this user.
PG_HOST, PG_PORT = "127.0.0.1", 5432


def pg_user() -> str:
    return os.environ.get("KEEL_TEST_PG_USER", "postgres")


class PgBouncer:
    """``start()`` / ``stop()`` a pgbouncer process on one fixed port (kept across restarts)."""

    def __init__(self, port: int | None = None, *, upstream_host: str = PG_HOST,
                 upstream_port: int = PG_PORT, users: tuple[str, ...] = ("postgres", "root"),
                 settings: dict[str, str] | None = None) -> None:
        binary = shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").is_file() else None)
        if binary is None:  # .ci/run installs it; say so plainly if not
            raise RuntimeError("pgbouncer is not installed (Debian: apt-get install pgbouncer; "
                               ".ci/run installs it)")
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.admin_user = users[0]
        self._dir = Path(tempfile.mkdtemp(prefix="keel-pgbouncer-"))
        (self._dir / "userlist.txt").write_text("".join(f'"{u}" ""\n' for u in users))
        ini = pgbouncer_ini(
            {"*": f"host={upstream_host} port={upstream_port}"},
            {"listen_addr": self.host, "listen_port": str(self.port), "unix_socket_dir": "",
             "auth_type": "trust", "auth_file": str(self._dir / "userlist.txt"),
             **PGBOUNCER_POOL_SETTINGS, "default_pool_size": "10", "max_client_conn": "200",
             "admin_users": self.admin_user, **(settings or {})})
        self.ini = self._dir / "pgbouncer.ini"
        self.ini.write_text(ini)
        self.log = self._dir / "pgbouncer.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _run_as(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        for user in ("postgres", "nobody"):
            try:
                pwd.getpwnam(user)
                return ["-u", user]
            except KeyError:
                continue
        raise RuntimeError("running as root and neither user postgres nor nobody exists")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def start(self, timeout_s: float = 10) -> None:
        if self._proc is not None:
            raise RuntimeError("already started")
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen([self.binary, *self._run_as(), str(self.ini)],
                                          stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"pgbouncer on port {self.port} exited: "
                                   f"{self.log.read_text()[-2000:]}")
            if self._accepts():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pgbouncer on port {self.port} did not start in {timeout_s} s")

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM): open client connections are closed."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None

    def close(self) -> None:
        """Stop it and remove its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def connect(self, dbname: str = "test", **kwargs: Any) -> Any:
        """A psycopg connection through PgBouncer as the tests' PostgreSQL user."""
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, dbname=dbname,
                               user=kwargs.pop("user", pg_user()), connect_timeout=5, **kwargs)

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console, rows as dicts (simple query protocol)."""
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, dbname="pgbouncer",
                             user=self.admin_user, connect_timeout=5, autocommit=True,
                             cursor_factory=psycopg.ClientCursor) as conn:
            cur = conn.execute(f"SHOW {what}")
            names = [column.name for column in cur.description or []]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
