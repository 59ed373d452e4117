"""The ingress's short-lived copy of each model's status (served version, specs). No Ray."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from deployments.contracts import ModelStatus
from deployments.errors import (
    DependencyUnavailable,
    KeelError,
    ModelNotFound,
    ModelNotReady,
    quoted,
)
from deployments.ingress.dataplane.config import IngressConfig
from deployments.ingress.pool.placement import ModelPool
from deployments.repository import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class _Cached:
    status: ModelStatus
    fetched: float


#: The longest a request waits for a model's status (its first, or a fresh one): a
#: status call that went to a hung replica must not hold requests for the replica's whole
#: removal (~45 s). Past it: 503 with Retry-After, or the copy already held.
STATUS_TIMEOUT_S = 5.0
#: How long requests wait for a refresh of a copy past its TTL before they use the copy.
STALE_WAIT_S = 0.25


@dataclass
class ModelCatalog:
    """The ingress's short-lived copy of each model's status.

    Validation needs the served version's spec on every request; asking the model
    deployment each time would add a hop, so the answer is kept for ``status_ttl_s``.
    Past it, ONE refresh runs for all the requests that need the model, and they wait
    for it, but only while it is young: once it has run ``STALE_WAIT_S`` without an
    answer (it went to a hung replica), the older copy is used instead, at once, until
    the refresh answers. So a copy is never used past its TTL while the model answers
    its status calls (a split or version changed by a deploy applies within the TTL),
    and a hung replica delays requests by ``STALE_WAIT_S`` at most. A request waits
    longer only for a model's first status, or for a fresh one (``fresh=True``: a
    result named a version the copy does not have), at most ``STATUS_TIMEOUT_S``. A
    copy is dropped early when a result reports a new version.
    """

    backend: ModelPool
    config: Callable[[], IngressConfig]
    _cache: dict[str, _Cached] = field(default_factory=dict)
    _refreshing: dict[str, asyncio.Task[ModelStatus]] = field(default_factory=dict)
    _refresh_began: dict[str, float] = field(default_factory=dict)

    def require(self, name: str) -> None:
        """404 for a model this ingress does not serve (before any body is read)."""
        if not self.backend.knows(name):
            raise ModelNotFound(f"model {quoted(name)} is not served here "
                                f"(models: {self.backend.listing()})")

    async def status(self, name: str, *, fresh: bool = False) -> ModelStatus:
        self.require(name)
        cached = self._cache.get(name)
        if cached is not None and not fresh:
            now = time.monotonic()
            if now - cached.fetched < self.config().status_ttl_s:
                return cached.status
            task = self._refresh(name)
            patience = self._refresh_began[name] + STALE_WAIT_S - now
            if patience <= 0:  # the refresh is slow: the held copy, until it answers
                return cached.status
            try:
                return await asyncio.wait_for(asyncio.shield(task), patience)
            except (TimeoutError, KeelError):
                return cached.status  # the refresh goes on in the background
        if fresh:  # its own call: one already running may have started before the change
            return await self._fetch(name)
        # Shared by every request waiting for this model's first status; shielded, so a
        # request that gives up does not cancel it for the others.
        return await asyncio.shield(self._refresh(name))

    def _refresh(self, name: str) -> asyncio.Task[ModelStatus]:
        """The refresh of ``name`` in flight, started if there is none."""
        task = self._refreshing.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(name))
            self._refreshing[name] = task
            self._refresh_began[name] = time.monotonic()
            task.add_done_callback(lambda done: self._refreshed(name, done))
        return task

    def _refreshed(self, name: str, task: asyncio.Task[ModelStatus]) -> None:
        if self._refreshing.get(name) is task:
            del self._refreshing[name]
        if not task.cancelled() and task.exception() is not None and name in self._cache:
            log.warning("model %s: status refresh failed (%s), using the last one", name,
                        task.exception())

    async def _fetch(self, name: str) -> ModelStatus:
        try:
            status = await asyncio.wait_for(self.backend.status(name), STATUS_TIMEOUT_S)
        except TimeoutError as exc:
            raise DependencyUnavailable(f"model {name!r} did not answer a status call within "
                                        f"{STATUS_TIMEOUT_S:g} s", retry_after_s=1) from exc
        self._cache[name] = _Cached(status, time.monotonic())
        return status

    async def spec(self, name: str, version: str | None) -> ModelSpec:
        """The spec to validate against: the pinned version's, or the served one's."""
        status = await self.status(name)
        if version is None:
            if status.served_version is None:
                raise ModelNotReady(f"model {name!r} is not loaded: {status.error or 'loading'}")
            version = status.served_version
        spec = status.loaded.get(version)
        if spec is None:
            status = await self.status(name, fresh=True)
            spec = status.loaded.get(version)
        if spec is None:
            if version in status.available_versions:
                raise ModelNotFound(f"model {name!r} version {quoted(version)} is in the "
                                    f"repository but not loaded (serving "
                                    f"{status.served_version!r})")
            raise ModelNotFound(f"model {name!r} has no version {quoted(version)} "
                                f"(versions: {status.available_versions})")
        return spec

    def held(self, name: str) -> ModelStatus | None:
        """The status this replica holds for ``name``, however old (never a call)."""
        cached = self._cache.get(name)
        return cached.status if cached is not None else None

    def saw_version(self, name: str, version: str) -> None:
        cached = self._cache.get(name)
        if cached is not None and cached.status.served_version != version:
            self._cache.pop(name, None)

    def forget(self, names: Iterable[str] | None = None) -> None:
        """Drop the copies of ``names`` (after a live reconfiguration of the models placed
        in the ingress: only theirs follow the Ingress's config), or every copy."""
        if names is None:
            self._cache.clear()
        for name in names or ():
            self._cache.pop(name, None)


def describe(exc: BaseException) -> str:
    if isinstance(exc, KeelError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__
