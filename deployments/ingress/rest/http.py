"""HTTP details of the ingress, in one place: media types, body limits, error answers.

No Ray here. Every router reads bodies through ``read_body`` and every error
leaves through the handlers ``install_error_handlers`` registers: a ``KeelError``
becomes ``{"error": message}`` (plus ``stage`` where known) with its status and
``Retry-After``; FastAPI's own validation errors become 400s naming the field.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.errors import (
    InvalidInput,
    KeelError,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    field_errors,
    quoted,
)
from deployments.ingress.dataplane import codec
from deployments.ingress.rest import openapi

# Where a route that learns its model from the body (/v1/decide, the LLM) leaves it for
# the request metrics (the telemetry middleware reads it).
from deployments.observability.asgi import MODEL_SCOPE_KEY as MODEL_SCOPE_KEY
from deployments.observability.asgi import VERSION_SCOPE_KEY as VERSION_SCOPE_KEY

log = logging.getLogger(__name__)

#: What a JSON route reads: JSON, or a body with no Content-Type (tritonclient's sync
#: client sends none).
JSON_ONLY = (openapi.JSON,)
#: What the inference routes read: JSON, or the binary tensor data extension.
JSON_OR_BINARY = (openapi.JSON, openapi.OCTET_STREAM)


def check_media_type(request: Request, accepted: tuple[str, ...]) -> None:
    """415 naming the header for a body the route cannot read as sent: another Content-Type,
    or any Content-Encoding (compressed bodies are refused, never inflated: a small gzip
    body can expand past every limit)."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {quoted(encoding)} is not accepted; "
                                   f"send the body uncompressed")
    raw = request.headers.get("content-type")
    if raw is None:
        return
    media_type = raw.split(";", 1)[0].strip().lower()
    if media_type not in accepted:
        raise UnsupportedMediaType(f"Content-Type {quoted(media_type)} is not accepted here; "
                                   f"send {' or '.join(accepted)}")


async def read_body(request: Request, limit: int,
                    media_types: tuple[str, ...] = JSON_ONLY) -> bytes:
    """Read the body, refusing (415) one in another media type or encoding and (413)
    anything over ``limit`` without reading it all."""
    check_media_type(request, media_types)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError as exc:
            raise InvalidInput("content-length header is not an integer") from exc
        if length < 0:
            raise InvalidInput("content-length header is negative")
        if length > limit:
            raise PayloadTooLarge(f"request body is {length} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def binary_json_length(request: Request) -> int | None:
    """The binary tensor extension's JSON length header, if sent (400 if not an integer)."""
    raw = request.headers.get(codec.BINARY_HEADER)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise InvalidInput(f"{codec.BINARY_HEADER} header is not an integer") from exc


class JSONBody(Response):
    """A JSON answer serialised with orjson (numpy arrays included)."""

    media_type = "application/json"

    def render(self, content: object) -> bytes:
        if isinstance(content, bytes):
            return content
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(status: int, message: str, retry_after_s: int | None = None,
                   stage: str | None = None) -> Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    body = {"error": message} if stage is None else {"error": message, "stage": stage}
    return JSONBody(body, status_code=status, headers=headers)


def error_answer(exc: BaseException) -> Response:
    """The answer to any error a REST request raised: the one table every route (the hot
    routes included) answers errors with. A ``KeelError`` is ``{"error": message}`` (plus
    ``stage``) with its status and ``Retry-After``; FastAPI's validation errors are 400s
    naming the field; Starlette's (404, 405) keep their status; anything else is a 500
    that names only the exception's type (logged with its trace)."""
    if isinstance(exc, KeelError):
        if exc.status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        response = error_response(exc.status, exc.message, exc.retry_after_s, exc.stage)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="keel"'
        return response
    if isinstance(exc, RequestValidationError):
        return error_response(400, "; ".join(field_errors(exc, limit=5)))
    if isinstance(exc, StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))
    log.error("unexpected error", exc_info=exc)
    return error_response(500, f"internal error ({type(exc).__name__})")


def install_error_handlers(app: FastAPI) -> None:
    """Every error as ``error_answer`` says; never FastAPI's 422 or a trace."""

    async def answer(_: Request, exc: Exception) -> Response:
        return error_answer(exc)

    for kind in (KeelError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, answer)
