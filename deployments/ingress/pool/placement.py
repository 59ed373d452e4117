"""Where the ingress's model calls go: in this process, or to a model deployment.

No Ray here. A model is placed either in its own ``OnnxModel`` deployment (the
default; reached through a ``ModelBackend`` of Ray handles) or **in the ingress**
(``EmbeddedModels``: the ONNX session lives in every ingress replica, for models
that cost less than a hop). ``ModelPool`` puts both behind one interface and
coalesces concurrent calls per model: one backend call (one handle call, one ONNX
Runtime run) per batch of requests, never a wait for a lone one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from deployments.contracts import InferCall, InferResult, ModelStatus
from deployments.errors import ConfigError, KeelError, ModelNotFound, quoted
from deployments.ingress.pool.coalescer import Coalescer
from deployments.onnx.core import ModelVersions, OnnxModelConfig
from deployments.repository import ModelRepository

log = logging.getLogger(__name__)

Placement = Literal["deployment", "ingress"]
#: Where a served model runs: a placement, or a fleet's shared deployment.
Where = Literal["deployment", "ingress", "fleet"]
Answer = InferResult | KeelError


class ModelBackend(Protocol):
    """A set of models the ingress can call: status, and many calls at once."""

    def model_names(self) -> list[str]: ...

    async def status(self, name: str) -> ModelStatus: ...

    async def infer_many(self, name: str, calls: list[InferCall]) -> Sequence[Answer]:
        """One answer per call, in order: its result or its own error."""
        ...

    async def infer_aside(self, name: str, calls: list[InferCall]) -> Sequence[Answer]:
        """As ``infer_many``, apart from live traffic (shadow copies): never in a live
        batch, never on the event loop that serves requests."""
        ...


class FleetBackend(ModelBackend, Protocol):
    """A fleet: models of one directory sharing a multiplexed deployment, whose
    membership is found on a model's first request."""

    fleet: str

    def owns(self, name: str) -> bool:
        """Whether ``name`` is a member (it may have been added since the last call)."""
        ...

    async def warm_up(self) -> None: ...


class EmbeddedModels:
    """Models run in this process (``placement: ingress``): ``ModelVersions`` per model,
    loaded, swapped and pinned exactly as an ``OnnxModel`` replica does it."""

    def __init__(self, repository: ModelRepository, names: Sequence[str]) -> None:
        self.repository = repository
        self._versions = {name: ModelVersions(repository, name) for name in names}
        self._configs: dict[str, OnnxModelConfig] = {}

    def model_names(self) -> list[str]:
        return sorted(self._versions)

    def config(self, name: str) -> OnnxModelConfig:
        return self._configs.get(name) or OnnxModelConfig()

    def apply(self, configs: dict[str, OnnxModelConfig]) -> list[str]:
        """Load what each model's config asks for (a new version loads before it replaces
        the old one); returns the models whose served runner changed."""
        unknown = sorted(set(configs) - set(self._versions))
        if unknown:
            known = self.repository.model_names() if self.repository.root.is_dir() else []
            typos = [name for name in unknown if name not in known]
            if typos:
                raise ConfigError(f"user_config.models: {typos} are not in the model "
                                  f"repository (ingress models: {self.model_names()})")
            # In the repository but not served by this application (args.models): unused.
            log.info("user_config.models: %s are not served here; their config is unused",
                     unknown)
        changed = []
        for name, versions in self._versions.items():
            config = configs.get(name) or OnnxModelConfig()
            if versions.apply(config):
                changed.append(name)
                _warm(versions)
            self._configs[name] = config
        return changed

    def _get(self, name: str) -> ModelVersions:
        versions = self._versions.get(name)
        if versions is None:
            raise ModelNotFound(f"model {quoted(name)} is not placed in the ingress")
        return versions

    async def status(self, name: str) -> ModelStatus:
        return self._get(name).status()

    async def infer_many(self, name: str, calls: list[InferCall]) -> Sequence[Answer]:
        # ONNX Runtime on this event loop: the model costs microseconds, a thread hop more.
        return self._get(name).infer_batch(calls)

    async def infer_aside(self, name: str, calls: list[InferCall]) -> Sequence[Answer]:
        # In a thread: a slow shadow version must not hold the loop live requests run on.
        return await asyncio.to_thread(self._get(name).infer_batch, calls)


def _warm(versions: ModelVersions) -> None:
    """One throw-away run on zeros, so the first request does not pay ORT's first-run
    allocations (only for models whose every input has a known row shape)."""
    import numpy as np

    runner = versions.current
    if runner is None or not all(t.batched for t in runner.spec.inputs):
        return
    if any(d < 0 for t in runner.spec.inputs for d in t.shape[1:]) or \
            any(t.datatype == "BYTES" for t in runner.spec.inputs):
        return
    inputs = {t.name: np.zeros([1, *t.shape[1:]], dtype=t.numpy_dtype)
              for t in runner.spec.inputs}
    try:
        runner.predict(inputs)
    except KeelError as exc:  # a model that refuses zeros still serves real rows
        log.info("model %s: warm-up run refused zeros (%s)", versions.name, exc.message)


class BatchObserver(Protocol):
    """Told the size of every batch sent to a model."""

    def model_batch(self, model: str, size: int) -> None: ...


class ModelPool:
    """Every model the ingress serves, wherever it is placed, with per-model coalescing.

    ``infer`` is what the predictor calls per request; concurrent calls to one model
    leave together as one ``infer_many`` on its backend. Ingress-placed models run one
    batch at a time (they run on this loop anyway); deployment-placed ones keep up to
    ``max_in_flight`` handle calls going, the rest queue into the next.
    """

    def __init__(self, embedded: EmbeddedModels | None, remote: ModelBackend | None, *,
                 fleets: Sequence[FleetBackend] = (),
                 max_batch_size: Callable[[str], int] = lambda _: 64,
                 max_in_flight: Callable[[], int] = lambda: 4,
                 observer: BatchObserver | None = None) -> None:
        self.embedded = embedded
        self.remote = remote
        self.fleets = list(fleets)
        self._observer = observer
        self._max_batch_size = max_batch_size
        self._max_in_flight = max_in_flight
        self._backends: dict[str, ModelBackend] = {}
        for backend in (embedded, remote):
            if backend is None:
                continue
            for name in backend.model_names():
                if name in self._backends:
                    raise ModelNotFound(f"model {name!r} is placed twice")
                self._backends[name] = backend
        self._fleet_of: dict[str, FleetBackend] = {}
        for fleet in self.fleets:
            for name in fleet.model_names():
                self._join(name, fleet)
        self._names = sorted(self._backends)
        self._coalescers: dict[str, Coalescer[InferCall, InferResult]] = {}

    def _join(self, name: str, fleet: FleetBackend) -> None:
        if name in self._backends:
            # Placed on its own (or in an earlier fleet): that placement answers it.
            log.warning("model %s of fleet %s is also served elsewhere; the fleet's copy "
                        "is not used", name, fleet.fleet)
            return
        self._backends[name] = fleet
        self._fleet_of[name] = fleet

    def model_names(self) -> list[str]:
        """Every model served here (fleet members: those found so far)."""
        return self._names

    def knows(self, name: str) -> bool:
        """Whether ``name`` is served here; a fleet's new member joins on this call."""
        if name in self._backends:
            return True
        for fleet in self.fleets:
            if fleet.owns(name):
                self._join(name, fleet)
                self._names = sorted(self._backends)
                return True
        return False

    def fleet(self, name: str) -> str | None:
        """The fleet a model belongs to, if any."""
        fleet = self._fleet_of.get(name)
        return fleet.fleet if fleet is not None else None

    def placement(self, name: str) -> Where:
        backend = self._backend(name)
        if backend is self.embedded:
            return "ingress"
        return "fleet" if name in self._fleet_of else "deployment"

    def _backend(self, name: str) -> ModelBackend:
        backend = self._backends.get(name)
        if backend is None and self.knows(name):
            backend = self._backends[name]
        if backend is None:
            raise ModelNotFound(f"model {quoted(name)} is not served here "
                                f"(models: {self.listing()})")
        return backend

    def listing(self) -> str:
        """The models served, for a 404 (fleets by name and size, not every member)."""
        own = [n for n in self._names if n not in self._fleet_of]
        fleets = [f"fleet {f.fleet!r} ({len(f.model_names())} models)" for f in self.fleets]
        return ", ".join([repr(n) for n in own] + fleets) or "none"

    async def status(self, name: str) -> ModelStatus:
        return await self._backend(name).status(name)

    async def infer(self, name: str, call: InferCall) -> InferResult:
        coalescer = self._coalescer(name)
        coalescer.max_batch_size = self._max_batch_size(name)
        if self.placement(name) != "ingress":
            coalescer.max_in_flight = self._max_in_flight()
        return await coalescer.submit(call)

    async def infer_aside(self, name: str, calls: list[InferCall]) -> Sequence[Answer]:
        """Calls that must not share a batch with live ones (shadow copies): one backend
        call, no coalescing."""
        return await self._backend(name).infer_aside(name, calls)

    def batch_stats(self, name: str) -> dict[str, float | int | None]:
        coalescer = self._coalescers.get(name)
        if coalescer is None:
            return {"batches": 0, "items": 0, "largest": 0, "mean": None}
        stats = coalescer.stats
        return {"batches": stats.batches, "items": stats.items, "largest": stats.largest,
                "mean": stats.mean_batch}

    def _coalescer(self, name: str) -> Coalescer[InferCall, InferResult]:
        coalescer = self._coalescers.get(name)
        if coalescer is None:
            backend = self._backend(name)

            async def run(calls: list[InferCall]) -> Sequence[InferResult | BaseException]:
                return await backend.infer_many(name, calls)

            def observe(size: int) -> None:
                if self._observer is not None:
                    self._observer.model_batch(name, size)

            in_flight = 1 if backend is self.embedded else self._max_in_flight()
            coalescer = Coalescer(run, max_batch_size=self._max_batch_size(name),
                                  max_in_flight=in_flight, on_batch=observe)
            self._coalescers[name] = coalescer
        return coalescer
