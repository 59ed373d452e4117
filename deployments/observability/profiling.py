"""Continuous profiling with Pyroscope (pyroscope-io). No Ray here.

pyroscope-io starts a native sampling agent in the calling process; it is not fork-safe,
so each replica configures it from its own ``__init__`` (after Ray started the actor
process), never at import time. Profiling is on only when an address is set
(``PYROSCOPE_SERVER_ADDRESS`` or ``KEEL_PYROSCOPE_ADDRESS``). The agent uploads from its
own thread and only logs when the server does not answer, so an absent or unreachable
server never touches a request; a failure to start the agent is logged, not raised.
"""

from __future__ import annotations

import logging
from typing import Any

from deployments.settings import ProfilingSettings

log = logging.getLogger(__name__)


#: The tags this process was configured with; ``None`` until profiling started here.
_configured: dict[str, str] | None = None


def server_address(settings: ProfilingSettings | None = None) -> str | None:
    """The Pyroscope server to send profiles to, or ``None`` (profiling off)."""
    return (settings or ProfilingSettings()).address.strip() or None


def profiling_tags(application: str | None, deployment: str | None,
                   model: str | None) -> dict[str, str]:
    """Pyroscope tags naming the replica (absent parts left out)."""
    tags = {"application": application, "deployment": deployment, "model": model}
    return {k: v for k, v in tags.items() if v}


def configure_profiling(application: str | None, deployment: str | None,
                        model: str | None = None, *,
                        settings: ProfilingSettings | None = None) -> bool:
    """Start the Pyroscope agent in this process, once; ``True`` if it runs now.

    Application name: ``PYROSCOPE_APPLICATION_NAME`` or ``keel``; tags: application,
    deployment, model. Optional ``PYROSCOPE_SAMPLE_RATE`` (Hz, default 100),
    ``PYROSCOPE_BASIC_AUTH_USER``/``_PASSWORD`` and ``PYROSCOPE_TENANT_ID``.
    """
    global _configured
    settings = settings or ProfilingSettings()
    address = server_address(settings)
    if address is None:
        return False
    tags = profiling_tags(application, deployment, model)
    if _configured is not None:
        if _configured != tags:
            log.warning("pyroscope already configured in this process with %s; %s ignored",
                        _configured, tags)
        return True
    try:
        import pyroscope

        options: dict[str, Any] = {
            "application_name": settings.application_name.strip() or "keel",
            "server_address": address,
            "sample_rate": settings.sample_rate,
            "basic_auth_username": settings.basic_auth_user,
            "basic_auth_password": settings.basic_auth_password.get_secret_value(),
            "tenant_id": settings.tenant_id,
            "tags": tags,
            # Request handlers run on Ray's event loop threads; sample every thread.
            "gil_only": False,
        }
        pyroscope.configure(**options)
    except Exception as exc:  # profiling is best effort: never fail the replica
        log.error("pyroscope not started (server %s): %r", address, exc)
        return False
    _configured = tags
    log.info("pyroscope: profiling to %s as %s", address, tags)
    return True


def shutdown_profiling() -> None:
    """Stop the agent (tests, and a replica shutting down)."""
    global _configured
    if _configured is None:
        return
    try:
        import pyroscope

        pyroscope.shutdown()
    except Exception as exc:
        log.warning("pyroscope shutdown failed: %r", exc)
    _configured = None
