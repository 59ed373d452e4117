"""A private, restartable redis-server on its own port: for the tests that stop Redis and
the resilience benchmarks (bench/resilience/), which share this one helper.

Never the machine's own Redis (127.0.0.1:6379), which other tests share.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path) -> TlsFiles:
        """A throw-away CA and server certificate, made with the openssl command."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("openssl is not installed")
        files = cls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
        ca_key = directory / "ca.key"

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], check=True, capture_output=True)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
            "/CN=keel-test-ca", "-keyout", str(ca_key), "-out", str(files.ca))
        csr = directory / "server.csr"
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(files.key), "-out", str(csr))
        extensions = directory / "san.ext"
        extensions.write_text("subjectAltName = IP:127.0.0.1\n")
        run("x509", "-req", "-in", str(csr), "-CA", str(files.ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "1", "-extfile", str(extensions), "-out",
            str(files.cert))
        return files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def quiet_port(low: int = 20000, high: int = 30000) -> int:
    """A free port for a server that binds it later (HAProxy's frontends, Ray's metrics):
    below the ephemeral range, where Ray's own servers bind port 0, and above Ray's worker
    ports (10002-19999), picked at random. A port from ``free_port`` can be taken in
    between, and HAProxy and gRPC bind with SO_REUSEPORT: the kernel then splits the
    connections between the two servers, silently (a CI run's gRPC calls once reached
    another test session's Keel)."""
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


class PrivateRedis:
    """``start()`` / ``stop()`` a redis-server (no persistence) on one fixed port."""

    def __init__(self, port: int | None = None, *, password: str | None = None,
                 tls: TlsFiles | None = None, directory: Path | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:  # the machine and CI have it; say so plainly if not
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        #: Where redis-server runs (``--dir``); it keeps nothing on disk either way.
        self.directory = directory
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def client(self, timeout_s: float = 2) -> redis.Redis:
        options: dict[str, object] = {"host": "127.0.0.1", "port": self.port,
                                      "socket_timeout": timeout_s, "password": self.password}
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        return redis.Redis(**options)  # type: ignore[arg-type]

    def start(self) -> None:
        args = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file",
                     str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                     "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        if self.directory is not None:
            args += ["--dir", str(self.directory)]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with self.client(timeout_s=0.2) as probe:
                    if probe.ping():
                        return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """Stop it (killed if it has not exited 10 s after SIGTERM); ``start`` again."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
