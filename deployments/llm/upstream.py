"""One OpenAI-compatible upstream (vLLM, OpenAI, a proxy): its client, its concurrency
limit and timeouts, and the Keel error for each way a call to it fails."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from deployments.errors import (
    BadGateway,
    InvalidInput,
    KeelError,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    UpstreamTimeout,
)
from deployments.llm.config import UpstreamConfig
from deployments.settings import LLMSettings


def upstream_error(upstream: str, status: int, headers: httpx.Headers | dict[str, str],
                   body: bytes) -> KeelError:
    """The Keel error for an upstream's non-2xx answer."""
    detail = _upstream_message(body)
    if status == 429:
        retry = _retry_after(headers.get("retry-after"))
        return RateLimited(f"upstream {upstream!r} is rate limiting: {detail}",
                           retry_after_s=retry)
    if status in (400, 413, 422):
        error = PayloadTooLarge if status == 413 else InvalidInput
        return error(f"upstream {upstream!r} refused the request: {detail}")
    if status >= 500:
        return BadGateway(f"upstream {upstream!r} failed with {status}: {detail}")
    return BadGateway(f"upstream {upstream!r} answered {status}: {detail}")


def transport_error(upstream: str, base_url: str, exc: Exception, timeout_s: float) -> KeelError:
    """The Keel error for a call that got no answer."""
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        return BadGateway(f"upstream {upstream!r} at {base_url} is unreachable "
                          f"({type(exc).__name__})")
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return UpstreamTimeout(f"upstream {upstream!r} did not answer within {timeout_s} s")
    return BadGateway(f"upstream {upstream!r} at {base_url} failed: {type(exc).__name__}")


def _retry_after(value: str | None) -> int:
    try:
        return max(0, int(float(value))) if value is not None else 1
    except ValueError:
        return 1  # an HTTP date: say "soon" rather than parse it


def _upstream_message(body: bytes) -> str:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:200].decode(errors="replace") or "(empty body)"
    if isinstance(document, dict):
        error = document.get("error", document)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        return str(error)[:300]
    return str(document)[:300]


class Upstream:
    """One upstream: its HTTP client (made on first use, in the replica), its semaphore."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.semaphore = asyncio.Semaphore(config.max_concurrency)
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            c = self.config
            headers = {}
            key = LLMSettings.reading(c.api_key_env).api_key
            if key is not None:
                headers["Authorization"] = f"Bearer {key.get_secret_value()}"
            self._client = httpx.AsyncClient(
                base_url=c.base_url.rstrip("/"), headers=headers,
                timeout=httpx.Timeout(c.timeout_s, connect=c.connect_timeout_s),
                limits=httpx.Limits(max_connections=c.max_concurrency,
                                    max_keepalive_connections=c.max_concurrency))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def acquire(self) -> None:
        """A slot, or 503 with Retry-After once ``queue_timeout_s`` has passed."""
        try:
            await asyncio.wait_for(self.semaphore.acquire(), self.config.queue_timeout_s)
        except TimeoutError as exc:
            raise Overloaded(f"upstream {self.config.name!r} is at its concurrency limit "
                             f"({self.config.max_concurrency}); retry shortly") from exc

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One non-streaming call; the answer's JSON, or the mapped Keel error."""
        c = self.config
        await self.acquire()
        try:
            async with asyncio.timeout(c.timeout_s):
                response = await self.client.post("/chat/completions", json=body)
        except KeelError:
            raise
        except Exception as exc:
            raise transport_error(c.name, c.base_url, exc, c.timeout_s) from exc
        finally:
            self.semaphore.release()
        if response.status_code >= 400:
            raise upstream_error(c.name, response.status_code, response.headers,
                                 response.content)
        try:
            answer = response.json()
        except ValueError as exc:
            raise BadGateway(f"upstream {c.name!r} answered with invalid JSON") from exc
        if not isinstance(answer, dict):
            raise BadGateway(f"upstream {c.name!r} answered with a non-object")
        return answer

    async def stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """A streaming call: raises the mapped error before the first chunk, then yields
        each ``data:`` chunk's JSON until ``[DONE]``."""
        c = self.config
        await self.acquire()
        try:
            request = self.client.build_request("POST", "/chat/completions", json=body)
            try:
                async with asyncio.timeout(c.timeout_s):
                    response = await self.client.send(request, stream=True)
            except Exception as exc:
                raise transport_error(c.name, c.base_url, exc, c.timeout_s) from exc
            try:
                if response.status_code >= 400:
                    content = await response.aread()
                    raise upstream_error(c.name, response.status_code, response.headers,
                                         content)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError as exc:
                        raise BadGateway(f"upstream {c.name!r} sent a malformed event") \
                            from exc
                    if isinstance(chunk, dict):
                        yield chunk
            except KeelError:
                raise
            except Exception as exc:
                raise transport_error(c.name, c.base_url, exc, c.timeout_s) from exc
            finally:
                await response.aclose()
        finally:
            self.semaphore.release()
