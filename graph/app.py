"""The application graph: the only place ``.bind()`` is called.

Ingress → one ``OnnxModel`` per model, the ``FeatureService`` over the Feast
repository (for ``/v1/decide``), the ``SloMonitor`` (for ``/v1/slo`` and the SLO
gauges) and the ``LLMGateway`` (for ``/v1/chat/completions``, unless ``llm: false``).

``serve_config.yaml`` names ``graph.app:build_app`` as its import path and
passes ``args`` (validated as ``AppArgs``); deployment options (replicas,
autoscaling, ``max_ongoing_requests``, ``user_config``) live in that file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.serve import Application, Deployment

from deployments.errors import ConfigError
from deployments.features.deployment import FeatureService
from deployments.fleet.core import FLEET_NAME, FleetArgs, fleet_members
from deployments.fleet.deployment import FleetModel
from deployments.ingress.deployment import Ingress, IngressArgs
from deployments.ingress.pool.placement import Placement
from deployments.llm.deployment import LLMGateway
from deployments.observability.deployment import SloMonitor
from deployments.onnx.deployment import OnnxModel
from deployments.paths import search_paths
from deployments.repository import ModelRepository
from deployments.settings import RepositorySettings
from deployments.stall.router import stall_aware


class AppArgs(BaseModel):
    """Structure and start-up values of the application (serve_config.yaml ``args``)."""

    model_config = ConfigDict(extra="forbid")

    #: Model repository; relative paths are tried against the working directory,
    #: then the project root. ``KEEL_MODEL_REPOSITORY`` overrides it.
    model_repository: str = "models"
    #: Models to serve; ``None`` serves every model in the repository.
    models: list[str] | None = Field(default=None, min_length=1)
    #: Feast feature repository behind ``/v1/decide`` (resolved like ``model_repository``;
    #: ``KEEL_FEATURE_REPO`` overrides it). ``None``: no FeatureService, /v1/decide is 503.
    feature_repo: str | None = "configs/feast"
    #: The feature_store.yaml to use inside ``feature_repo`` (``KEEL_FEATURE_STORE_YAML``
    #: overrides it): the embedded default, or e.g. ``feature_store.production.yaml``.
    feature_store_yaml: str = "feature_store.yaml"
    #: The LLM gateway behind ``/v1/chat/completions`` (its upstreams are the
    #: ``LLMGateway`` deployment's user_config). ``False``: those routes answer 503.
    llm: bool = True
    #: Where each model runs: ``deployment`` (the default: its own replicated, autoscaled
    #: ``OnnxModel`` deployment, named after the model) or ``ingress`` (its ONNX session in
    #: every Ingress replica, batched there, scaled with the ingress, configured by the
    #: Ingress's ``user_config.models.<name>``). Place a model in the ingress only when it
    #: costs less than a hop (a CPU model answering a batch in well under a millisecond).
    placement: dict[str, Placement] = Field(default_factory=dict)
    #: Multiplexed fleets, by deployment name: many small models of one directory of the
    #: repository (e.g. per-tenant models under ``models/tenants``) sharing one
    #: ``FleetModel`` deployment that loads them on demand, at most
    #: ``max_models_per_replica`` per replica (docs/models.md: fleets).
    fleets: dict[str, FleetArgs] = Field(default_factory=dict)

    @field_validator("fleets")
    @classmethod
    def _fleet_names(cls, fleets: dict[str, FleetArgs]) -> dict[str, FleetArgs]:
        for name in fleets:
            if not re.fullmatch(FLEET_NAME, name):
                raise ValueError(f"{name!r} is not a valid deployment name")
            if name in RESERVED_DEPLOYMENTS:
                raise ValueError(f"{name!r} is one of Keel's own deployments "
                                 f"({sorted(RESERVED_DEPLOYMENTS)}); name the fleet otherwise")
        directories = [f.directory for f in fleets.values()]
        shared = sorted({d for d in directories if directories.count(d) > 1})
        if shared:
            raise ValueError(f"directory {shared} is named by more than one fleet")
        return fleets


#: Deployments every Keel application may hold besides its models and fleets.
RESERVED_DEPLOYMENTS = frozenset({"Ingress", "SloMonitor", "FeatureService", "LLMGateway"})


def resolve_repository(path: str, *, what: str = "model repository") -> Path:
    """Find a repository directory as an absolute path (replicas may run elsewhere);
    relative paths are tried against the working directory, then the project root."""
    chosen = Path(path).expanduser()
    candidates = search_paths(chosen)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise ConfigError(f"{what} {str(chosen)!r} not found (looked in "
                      f"{[str(c) for c in candidates]}); run `keel prepare` to build the demo")


def resolve_feature_store(args: AppArgs) -> tuple[Path, Path] | None:
    """The Feast repository and its feature_store.yaml, or ``None`` when turned off."""
    settings = RepositorySettings()
    if args.feature_repo is None and not settings.feature_repo:
        return None
    repo = resolve_repository(settings.feature_repo or args.feature_repo or "",
                              what="feature repository")
    yaml_file = repo / (settings.feature_store_yaml or args.feature_store_yaml)
    if not yaml_file.is_file():
        raise ConfigError(f"args.feature_store_yaml: {str(yaml_file)!r} does not exist")
    return repo, yaml_file


def build_app(args: AppArgs | dict[str, Any] | None = None) -> Application:
    """The application, bound by keyword: the Ingress and what it holds: one
    ``OnnxModel`` deployment per model not placed in it, one ``FleetModel`` deployment per
    fleet, the ``FeatureService`` (unless turned off), the ``SloMonitor`` and the
    ``LLMGateway`` (unless turned off)."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    root = resolve_repository(RepositorySettings().model_repository or parsed.model_repository)
    names, available = served_models(parsed, root)
    embedded = [n for n in names if parsed.placement.get(n) == "ingress"]
    fleet_dirs = fleet_directories(parsed, root, available)
    store = resolve_feature_store(parsed)
    ingress_args = IngressArgs(repository=str(root), embedded=embedded,
                               fleet_directories={name: str(path)
                                                  for name, path in fleet_dirs.items()})
    # user_config={} makes Serve call reconfigure(), which checks each deployment's knobs.
    return _deployment(Ingress).options(user_config={}).bind(
        args=ingress_args.model_dump(),
        models={name: _deployment(OnnxModel).options(
                    name=name, user_config={}, request_router_config=stall_aware()
                ).bind(name, str(root))
                for name in names if name not in embedded},
        fleets={name: _deployment(FleetModel).options(
                    name=name, user_config={}, request_router_config=stall_aware()
                ).bind(name, str(fleet_dirs[name]), fleet.max_models_per_replica)
                for name, fleet in parsed.fleets.items()},
        features=None if store is None else _deployment(FeatureService).options(
            user_config={}, request_router_config=stall_aware()
        ).bind(str(store[0]), str(store[1])),
        slo_monitor=_deployment(SloMonitor).options(user_config={}).bind(),
        llm=_deployment(LLMGateway).options(user_config={}).bind() if parsed.llm else None)


def _deployment(cls: Any) -> Deployment:
    """``@serve.deployment`` returns a Deployment; Ray's stubs type it as the class."""
    return cast(Deployment, cls)


def served_models(args: AppArgs, root: Path) -> tuple[list[str], list[str]]:
    """The models to serve (``args.models``, or every model of the repository) and every
    model the repository holds; refuses a missing model, a broken model.yaml (naming the
    file) and a placement for a model the repository lacks."""
    repository = ModelRepository(root)
    available = repository.model_names()
    names = args.models or available
    if not names and not args.fleets:
        raise ConfigError(f"model repository {str(root)!r} holds no model; "
                          f"run `keel prepare` to build the demo models")
    missing = [n for n in names if n not in available]
    if missing:
        raise ConfigError(f"args.models: {missing} not in the repository {str(root)!r} "
                          f"(it has {available})")
    for name in names:
        repository.spec(name)  # a broken model.yaml fails the deploy, naming the file
    stray = sorted(set(args.placement) - set(available))
    if stray:
        raise ConfigError(f"args.placement: {stray} are not in the repository {str(root)!r} "
                          f"(it has {available})")
    return names, available


def fleet_directories(args: AppArgs, root: Path, models: list[str]) -> dict[str, Path]:
    """Each fleet's directory under the repository ``root``; refuses a missing one, a
    fleet named like a model, and a member named like a model served on its own."""
    directories: dict[str, Path] = {}
    for name, fleet in args.fleets.items():
        where = f"args.fleets.{name}"
        if name in models:
            raise ConfigError(f"{where}: {name!r} is also a model of the repository; a "
                              f"fleet's deployment needs a name of its own")
        directory = root / fleet.directory
        if not directory.is_dir():
            raise ConfigError(f"{where}.directory: {str(directory)!r} does not exist "
                              f"(run `keel prepare` for the demo fleet)")
        clashes = sorted(set(fleet_members(directory)) & set(models))
        if clashes:
            raise ConfigError(f"{where}: {clashes} are both fleet members and models of "
                              f"the repository; rename one")
        directories[name] = directory
    return directories
