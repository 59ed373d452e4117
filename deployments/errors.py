"""One small error hierarchy; each class carries the HTTP status it maps to.

The ingress turns any ``KeelError`` into ``{"error": message}`` with ``status``
(and ``Retry-After`` where set) through a single handler table.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class KeelError(Exception):
    """Base of every error Keel reports to a client."""

    status: int = 500
    #: The step of the request path that failed ("features", "model", ...), where known;
    #: answered as ``{"error": ..., "stage": ...}`` so a client and an operator can tell
    #: a slow feature store from a slow model.
    stage: str | None = None

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def at(self, stage: str) -> KeelError:
        """This error, marked with the stage it happened in (kept if already set)."""
        if self.stage is None:
            self.stage = stage
        return self

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross Ray process boundaries; keep the keyword arguments on the way.
        return (_rebuild, (type(self), self.message, self.retry_after_s, self.stage))


def _rebuild(cls: type[KeelError], message: str, retry_after_s: int | None,
             stage: str | None = None) -> KeelError:
    error = cls(message, retry_after_s=retry_after_s)
    error.stage = stage
    return error


class InvalidInput(KeelError):
    """The request is malformed or does not match the model's declared inputs."""

    status = 400


class PayloadTooLarge(InvalidInput):
    """The request body is larger than the configured limit."""

    status = 413


class ModelNotFound(KeelError):
    """No such model, or no such version of it."""

    status = 404

    def __init__(self, message: str, *, retry_after_s: int | None = None,
                 serving: str | None = None) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        #: For a version that is not loaded: the version the answering replica serves
        #: (replicas of one model can disagree for a moment while a new version rolls out).
        self.serving = serving

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_not_found, (self.message, self.stage, self.serving))


def _rebuild_not_found(message: str, stage: str | None, serving: str | None) -> ModelNotFound:
    error = ModelNotFound(message, serving=serving)
    error.stage = stage
    return error


class EntityNotFound(KeelError):
    """An entity of an entity-keyed request is not in the feature store."""

    status = 404


class ModelNotReady(KeelError):
    """The model exists but cannot answer yet (loading, or failed to load)."""

    status = 503


class Overloaded(KeelError):
    """Too many requests queued; the client should retry after a pause."""

    status = 503

    def __init__(self, message: str, *, retry_after_s: int | None = 1) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class DependencyUnavailable(KeelError):
    """A dependency (feature store, cache, model replica) does not answer."""

    status = 503


class RateLimited(KeelError):
    """An upstream (e.g. an LLM provider) asked to slow down; ``Retry-After`` passes through."""

    status = 429

    def __init__(self, message: str, *, retry_after_s: int | None = 1) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class BadGateway(KeelError):
    """An upstream answered with an error, or could not be reached."""

    status = 502


class UpstreamTimeout(KeelError):
    """A stage of the request (feature lookup, model call, upstream) did not answer within
    the request's time budget; the work behind it is cancelled."""

    status = 504


class ConfigError(KeelError):
    """A configuration value is invalid; raised at start-up or reconfigure."""

    status = 500


def field_errors(exc: Any, prefix: str = "", limit: int | None = None) -> list[str]:
    """A pydantic ``ValidationError`` (or FastAPI's ``RequestValidationError``: anything
    with pydantic-style ``errors()``) as ``<prefix><field.path>: <message>`` lines."""
    lines = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"])
        lines.append(f"{prefix}{loc}: {err['msg']}" if loc or prefix else err["msg"])
    return lines


def parse_user_config(model: type[M], raw: dict[str, Any] | None, deployment: str) -> M:
    """Validate a deployment's ``user_config``; a ``ConfigError`` names the deployment
    and every bad field."""
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        where = "; ".join(field_errors(exc))
        raise ConfigError(f"deployment {deployment!r} user_config: {where}") from exc


class Unauthorized(KeelError):
    """No API key, or one that matches no stored key (answered with ``WWW-Authenticate``)."""

    status = 401


class Forbidden(KeelError):
    """A valid API key without access to the model it asked for."""

    status = 403


class UnsupportedMediaType(InvalidInput):
    """A body in a Content-Type or Content-Encoding the route does not read (415)."""

    status = 415


#: Longest client-given value echoed back in an error message.
ECHO_CHARS = 80


def quoted(value: object) -> str:
    """A client-given name or id for an error message: ``repr`` (control and bidi
    characters escaped, so a message cannot hide or reorder text), cut to ``ECHO_CHARS``
    so that a huge value is not sent back."""
    if isinstance(value, str) and len(value) > ECHO_CHARS:
        return f"{value[:ECHO_CHARS]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= 2 * ECHO_CHARS else f"{text[:2 * ECHO_CHARS]}..."
