"""The HAProxy wrapper Ray is pointed at: Ray's own binary, run with ``-dS`` (no splice())."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
