"""The HAProxy wrapper Ray is pointed at: Ray's own binary, run with ``-dS`` (no splice())."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from graph.haproxy_nosplice import (
    BINARY_ENV,
    is_wrapper,
    real_haproxy,
    without_splice,
    wrapper,
)


def test_the_wrapper_runs_rays_haproxy_without_splice(tmp_path: Path) -> None:
    path = wrapper(tmp_path)
    assert is_wrapper(path) and f"{real_haproxy()}" in path.read_text()
    assert " -dS " in path.read_text()
    version = subprocess.run([str(path), "-v"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and "HAProxy version" in version.stdout
    # Pointed at the wrapper, the real binary is still found (never wrapped twice).
    assert real_haproxy({BINARY_ENV: str(path)}) == real_haproxy({})
    assert wrapper(tmp_path) == path


def test_only_an_environment_that_turns_haproxy_on_gets_it() -> None:
    assert BINARY_ENV not in without_splice({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"})
    env = without_splice({"RAY_SERVE_ENABLE_HA_PROXY": "1"})
    assert is_wrapper(Path(env[BINARY_ENV]))
    chosen = {"RAY_SERVE_ENABLE_HA_PROXY": "1", BINARY_ENV: "/opt/my/haproxy"}
    assert without_splice(chosen) == chosen  # an operator's own choice is kept


def test_the_default_folder_is_private_and_one_per_wrapped_binary(tmp_path: Path) -> None:
    """Under the shared temp directory, a folder per user and wrapped binary (two checkouts
    never rewrite each other's wrapper: a CI run beside a second checkout once ran the
    other checkout's HAProxy), 0700, and refused when anyone else may write to it."""
    import os
    import stat

    ours = wrapper()
    assert ours.parent.name.startswith(f"keel-haproxy-{os.getuid()}-")
    assert stat.S_IMODE(ours.parent.stat().st_mode) == 0o700
    assert real_haproxy({BINARY_ENV: str(ours)}) == real_haproxy({})
    other = tmp_path / "bin" / "haproxy"
    other.parent.mkdir()
    other.write_text("#!/bin/sh\n")
    elsewhere = wrapper(binary=str(other))
    assert elsewhere.parent != ours.parent and str(other) in elsewhere.read_text()
    assert wrapper() == ours and str(other) not in ours.read_text()
    elsewhere.parent.chmod(0o777)
    try:
        with pytest.raises(PermissionError, match="not a private directory"):
            wrapper(binary=str(other))
    finally:
        elsewhere.parent.chmod(0o700)
