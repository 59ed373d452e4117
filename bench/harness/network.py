"""Free ports and small blocking HTTP calls (readiness probes, stats, control routes)."""

from __future__ import annotations

import random
import socket
import urllib.error
import urllib.request


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` (connections left in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the kernel says is free now (in the ephemeral range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(low: int, high: int, size: int) -> int:
    """The first port of ``size`` consecutive free ports in ``[low, high)``."""
    for _ in range(200):
        base = random.randrange(low, high - size)
        if all(port_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports in [{low}, {high})")


def quiet_port() -> int:
    """A free port below the ephemeral range (and Ray's worker ports, 10002-19999): a port
    picked there cannot be taken by one of Ray's own servers before the server binds it
    (seen once: the benchmark's first request got Ray's HTTP/2 frames)."""
    return free_port_block(20000, 30000, 1)


def http_get(url: str, timeout: float = 3.0, *, limit: int | None = 2000) -> tuple[int, str]:
    """Status and (the first ``limit`` characters of) the body; an HTTP error status is
    returned, a connection error raised (OSError)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, _text(resp.read() if limit is None else resp.read(limit))
    except urllib.error.HTTPError as exc:
        return exc.code, _text(exc.read() if limit is None else exc.read(limit))


def _text(body: bytes) -> str:
    return body.decode("utf-8", "replace")


def http_get_or_error(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """``http_get`` of the whole body, with a connection error as status 0 and its text."""
    try:
        return http_get(url, timeout, limit=None)
    except (OSError, urllib.error.URLError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"


def http_post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, str]:
    """POST a JSON body; status and the first 4,000 characters of the answer."""
    request = urllib.request.Request(url, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read(4000).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4000).decode("utf-8", "replace")
