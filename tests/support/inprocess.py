"""An in-process ``ModelBackend``: real ``ModelVersions`` objects, no Ray, nothing mocked.

It answers the ingress the way ``deployments/onnx/deployment.py``'s ``OnnxModel``
does, minus ``@serve.batch``: one ``infer_batch`` call per coalesced batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.contracts import InferCall, InferResult, ModelStatus
from deployments.errors import KeelError, ModelNotFound
from deployments.fleet.core import (
    CachingRepository,
    FleetMember,
    fleet_members,
    fleet_status,
    holds,
)
from deployments.ingress.rest.app import IngressConfig
from deployments.llm.chat import ChatCall
from deployments.llm.gateway import ChatGateway
from deployments.onnx.core import ModelVersions, OnnxModelConfig, RuntimeOptions
from deployments.repository import ModelRepository


class InProcessModels:
    """One ``ModelVersions`` per model name of a repository, applied with its config."""

    def __init__(self, repository: ModelRepository,
                 configs: dict[str, OnnxModelConfig] | None = None) -> None:
        self.repository = repository
        self.versions: dict[str, ModelVersions] = {}
        configs = configs or {}
        for name in repository.model_names():
            versions = ModelVersions(repository, name)
            versions.apply(configs.get(name, OnnxModelConfig()))
            self.versions[name] = versions

    def apply(self, name: str, config: OnnxModelConfig) -> bool:
        """What ``OnnxModel.reconfigure`` does to the runners: load and swap."""
        return self._versions(name).apply(config)

    def _versions(self, name: str) -> ModelVersions:
        versions = self.versions.get(name)
        if versions is None:
            raise ModelNotFound(f"model {name!r} is not served here")
        return versions

    def model_names(self) -> list[str]:
        return sorted(self.versions)

    async def status(self, name: str) -> ModelStatus:
        return self._versions(name).status()

    async def infer_many(self, name: str, calls: list[InferCall]
                         ) -> Sequence[InferResult | KeelError]:
        """What ``OnnxModel.infer_many`` answers: one result or error per call."""
        return self._versions(name).infer_batch(calls)

    async def infer_aside(self, name: str, calls: list[InferCall]
                          ) -> Sequence[InferResult | KeelError]:
        """What ``OnnxModel.infer_aside`` answers: the same, in a thread."""
        return await asyncio.to_thread(self._versions(name).infer_batch, calls)


class InProcessFleet:
    """A fleet backend without Ray: what ``FleetModel`` answers (real ``FleetMember``
    objects, loaded on first use; no LRU), with ``FleetHandles``'s membership rule."""

    def __init__(self, fleet: str, directory: Path) -> None:
        self.fleet = fleet
        self.directory = directory
        self.members: dict[str, FleetMember] = {}
        self.repository = CachingRepository(directory)
        self._known = set(fleet_members(directory))
        self.warmed = 0

    def owns(self, name: str) -> bool:
        if name in self._known or holds(self.directory, name):
            self._known.add(name)
            return True
        return False

    def model_names(self) -> list[str]:
        return sorted(self._known)

    def _member(self, name: str) -> FleetMember:
        member = self.members.get(name)
        if member is None:
            member = FleetMember(self.repository, name, RuntimeOptions())
            self.members[name] = member
        return member

    async def status(self, name: str) -> ModelStatus:
        return fleet_status(self.repository, self.fleet, name)

    async def infer_many(self, name: str, calls: list[InferCall]
                         ) -> Sequence[InferResult | KeelError]:
        member = self._member(name)
        if member.needs_refresh(calls, RuntimeOptions()):
            member.refresh(RuntimeOptions())
        return member.infer_batch(calls)

    async def infer_aside(self, name: str, calls: list[InferCall]
                          ) -> Sequence[InferResult | KeelError]:
        return await self.infer_many(name, calls)

    async def warm_up(self) -> None:
        self.warmed += 1


@dataclass
class MutableIngressConfig:
    """The ingress's live settings, changeable by a test while the app runs."""

    value: IngressConfig = field(default_factory=IngressConfig)

    def __call__(self) -> IngressConfig:
        return self.value


class InProcessLLM:
    """The routes' backend without Ray: a ``ChatGateway`` in this process."""

    def __init__(self, gateway: ChatGateway) -> None:
        self.gateway = gateway

    async def complete(self, call: ChatCall) -> Any:
        return await self.gateway.complete(call)

    def stream(self, call: ChatCall) -> AsyncIterator[str]:
        return self.gateway.stream(call)

    async def usage(self) -> dict[str, Any]:
        return await self.gateway.usage()
