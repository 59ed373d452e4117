"""The Ray side of tracing and profiling: what a replica calls, and Ray's exporter hook.

``observe_replica`` is called from each deployment's ``__init__`` (inside the replica
process, after start): it names the replica on its spans and starts the profiler. The
plain logic lives in ``tracing`` and ``profiling``; this module only reads Serve's
replica context.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry.sdk.trace import SpanProcessor
from ray import serve

from deployments.observability import profiling, tracing

log = logging.getLogger(__name__)

#: The value for ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` (or serve_config.yaml's
#: ``tracing_config.exporter_import_path``) that sends Serve's and Keel's spans to OTLP.
EXPORTER_IMPORT_PATH = "deployments.observability.replica:span_processors"


def replica_user_config() -> dict[str, Any]:
    """This replica's ``user_config`` as Serve deploys it; empty outside a replica. A
    replica reads it in ``__init__`` to load what it pins before its first request."""
    try:
        context = serve.get_replica_context()
    except Exception:  # not running inside Serve
        return {}
    config = getattr(context, "_deployment_config", None)
    value = getattr(config, "user_config", None)
    return value if isinstance(value, dict) else {}


def replica_max_ongoing_requests() -> int | None:
    """This replica's ``max_ongoing_requests``; ``None`` outside a replica."""
    try:
        context = serve.get_replica_context()
    except Exception:  # not running inside Serve
        return None
    config = getattr(context, "_deployment_config", None)
    value = getattr(config, "max_ongoing_requests", None)
    return value if isinstance(value, int) else None


def replica_identity() -> tuple[str | None, str | None]:
    """This replica's application and deployment; ``(None, None)`` outside Serve."""
    try:
        context = serve.get_replica_context()
    except Exception:  # not inside a replica (unit tests, scripts)
        return None, None
    app = getattr(context, "app_name", None)
    deployment = getattr(context, "deployment", None)
    return (app if isinstance(app, str) else None,
            deployment if isinstance(deployment, str) else None)


def observe_replica(model: str | None = None) -> None:
    """Tag this replica's spans and start Pyroscope if configured; never raises."""
    try:
        application, deployment = replica_identity()
        tracing.set_replica_attributes(application, deployment, model)
        profiling.configure_profiling(application, deployment, model)
    except Exception as exc:  # observability is never a reason for a replica to fail
        log.error("observability setup failed: %r", exc)


def span_processors() -> list[SpanProcessor]:
    """Ray Serve's tracing exporter hook (no arguments, returns span processors).

    Ray calls it in every replica when ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` names
    it, after the replica context is set and right before it builds the tracer provider,
    so the resource variables set here become the spans' resource.
    """
    application, deployment = replica_identity()
    os.environ.update(tracing.resource_attributes_env(application, deployment))
    tracing.set_replica_attributes(application, deployment)
    return tracing.otlp_span_processors()
