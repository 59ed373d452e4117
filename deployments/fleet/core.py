"""Multiplexed model fleets: many small models sharing one deployment (no Ray here).

A fleet is a directory of the model repository (``models/tenants/<name>/<version>/``),
laid out like the repository itself. One ``FleetModel`` deployment serves every model
in it: each replica loads a model on its first request (Ray Serve's
``serve.multiplexed``), keeps at most ``max_models_per_replica`` of them and unloads the
least recently used. Each member serves its latest version.

``FleetMember`` is one loaded model; ``FleetLedger`` is a replica's own account of
what it loaded, unloaded and answered (what tests and ``stats()`` read);
``fleet_status`` answers the ingress's status call from the repository, without
loading the model; ``CachingRepository`` keeps the parsed specs both read.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from deployments.contracts import InferCall, InferResult, ModelStatus
from deployments.errors import KeelError, ModelNotFound, quoted
from deployments.onnx.core import ModelVersions, OnnxModelConfig, RuntimeOptions
from deployments.repository import ModelRepository, ModelSpec, version_key

#: A fleet directory and a fleet deployment name follow the model-name rule.
FLEET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class FleetArgs(BaseModel):
    """One fleet in ``serve_config.yaml``'s ``args.fleets`` (keyed by its deployment's
    name): start-up values, so changing them restarts the fleet's replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The fleet's directory, relative to the model repository (e.g. ``tenants``).
    directory: str = Field(min_length=1, pattern=FLEET_NAME)
    #: Models one replica keeps loaded; a request for another unloads the least
    #: recently used (Ray Serve's ``max_num_models_per_replica``).
    max_models_per_replica: int = Field(default=10, ge=1, le=100_000)


class FleetConfig(BaseModel):
    """The live knobs of a fleet deployment (its ``user_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ONNX Runtime options of every member; a loaded member reloads on its next call
    #: after a change.
    runtime: RuntimeOptions = Field(default_factory=RuntimeOptions)


def fleet_members(directory: Path) -> list[str]:
    """The models a fleet directory holds (each with at least one complete version)."""
    return ModelRepository(directory).model_names() if directory.is_dir() else []


def holds(directory: Path, name: str) -> bool:
    """Whether ``name`` may be a member of the fleet in ``directory``: a valid model name
    with a directory there (cheap: one ``stat``; its versions are checked on load)."""
    return _valid_name(name) and (directory / name).is_dir()


def _valid_name(name: str) -> bool:
    return re.fullmatch(FLEET_NAME, name) is not None


#: How often a loaded member looks for a newer version in the repository (on a call).
LATEST_CHECK_S = 1.0


class FleetMember:
    """One loaded model of a fleet: its latest version's ONNX Runtime session.

    On a call, at most once per :data:`LATEST_CHECK_S` (and at once when a call is keyed
    with a newer version than the loaded one), the member looks for a newer version in
    the repository and reloads on it; the version it replaced stays loaded for requests
    pinned to it (as a model deployment keeps it). Older versions are not loaded: a call
    pinning one gets a 404 naming the version served.
    """

    def __init__(self, repository: ModelRepository, name: str, runtime: RuntimeOptions,
                 on_unload: Callable[[str], None] | None = None) -> None:
        self._unloaded = True  # until it has loaded: nothing to tell if loading fails
        self.name = name
        self._repository = repository
        self._versions = ModelVersions(repository, name)
        self._versions.apply(OnnxModelConfig(runtime=runtime))
        self._checked = time.monotonic()
        self._on_unload = on_unload
        self._unloaded = False

    @property
    def version(self) -> str:
        current = self._versions.current
        assert current is not None  # apply() loaded it or raised
        return current.version

    @property
    def runtime(self) -> RuntimeOptions:
        current = self._versions.current
        assert current is not None
        return current.options

    def needs_refresh(self, calls: Sequence[InferCall], runtime: RuntimeOptions,
                      now: float | None = None) -> bool:
        """Cheap (no file access): whether it is time for ``refresh``."""
        now = time.monotonic() if now is None else now
        return runtime != self.runtime or now - self._checked >= LATEST_CHECK_S or any(
            c.version is not None and c.version != self.version
            and version_key(c.version) > version_key(self.version) for c in calls)

    def refresh(self, runtime: RuntimeOptions) -> bool:
        """Reload on the repository's latest version when it is newer than the loaded
        one, or with ``runtime`` when it changed; True when it reloaded. Blocking (a
        directory listing, maybe a session): call it off the event loop."""
        self._checked = time.monotonic()
        latest = self._repository.latest_version(self.name)
        if runtime == self.runtime and latest == self.version:
            return False
        return self._versions.apply(OnnxModelConfig(runtime=runtime))

    def infer_batch(self, calls: Sequence[InferCall]) -> list[InferResult | KeelError]:
        return self._versions.infer_batch(calls)

    def unload(self) -> None:
        """Told once that the replica dropped this member (Ray Serve's LRU calls
        ``__del__``; the garbage collector may call it again)."""
        if self._unloaded:
            return
        self._unloaded = True
        if self._on_unload is not None:
            self._on_unload(self.name)

    def __del__(self) -> None:
        self.unload()


class FleetLedger:
    """A replica's account of its fleet: loads, unloads, calls and rows per member, what
    is loaded now, and load times. Thread-safe (members load in a worker thread, and
    Ray unloads them in one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.loads: Counter[str] = Counter()
        self.unloads: Counter[str] = Counter()
        self.failed_loads: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self.load_ms: list[float] = []
        self._loaded: set[str] = set()

    def loaded(self, name: str, elapsed_ms: float) -> None:
        with self._lock:
            self.loads[name] += 1
            self._loaded.add(name)
            self.load_ms.append(round(elapsed_ms, 3))
            del self.load_ms[:-1000]

    def load_failed(self, name: str) -> None:
        with self._lock:
            self.failed_loads[name] += 1

    def unloaded(self, name: str) -> None:
        with self._lock:
            self.unloads[name] += 1
            self._loaded.discard(name)

    def answered(self, name: str, rows: int) -> None:
        with self._lock:
            self.calls[name] += 1
            self.rows[name] += rows

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"loaded": sorted(self._loaded), "loads": dict(self.loads),
                    "unloads": dict(self.unloads), "failed_loads": dict(self.failed_loads),
                    "calls": dict(self.calls), "rows": dict(self.rows),
                    "load_ms": list(self.load_ms)}


class CachingRepository(ModelRepository):
    """A fleet directory whose parsed ``model.yaml`` files are kept, by (name, version):
    a version directory does not change once written, so neither a member's load nor the
    ingress's status calls parse YAML after the first time (py-spy: parsing was 60 % of
    a load). Bounded (least recently used out)."""

    def __init__(self, root: str | Path, max_entries: int = 4096) -> None:
        super().__init__(root)
        self._max = max_entries
        self._specs: OrderedDict[tuple[str, str], ModelSpec] = OrderedDict()
        self._lock = threading.Lock()

    def spec(self, name: str, version: str | None = None) -> ModelSpec:
        version = version or self.latest_version(name)
        key = (name, version)
        with self._lock:
            spec = self._specs.get(key)
            if spec is not None:
                self._specs.move_to_end(key)
                return spec
        spec = super().spec(name, version)
        with self._lock:
            self._specs[key] = spec
            while len(self._specs) > self._max:
                self._specs.popitem(last=False)
        return spec


def fleet_status(repository: ModelRepository, fleet: str, name: str) -> ModelStatus:
    """A member's status as the ingress needs it (its latest versions' specs), read from
    the repository: answering it never loads the model. 404 naming the model and the
    fleet when the fleet's directory does not hold it."""
    if not _valid_name(name):
        raise ModelNotFound(f"model {quoted(name)} is not a valid model name")
    try:
        versions = repository.versions(name)
    except ModelNotFound as exc:
        raise ModelNotFound(f"model {quoted(name)} is not in fleet {fleet!r} "
                            f"({exc.message})") from exc
    # The latest, and the one before it: a replica that held the member before the
    # latest arrived answers with it until its next look at the repository (and keeps it
    # for pinned requests after).
    return ModelStatus(name=name, served_version=versions[-1],
                       loaded={v: repository.spec(name, v) for v in versions[-2:]},
                       available_versions=versions, providers=[])
