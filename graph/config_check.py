"""``keel check-config``'s checks of a serve config (shared by the CLI and ``keel
render-k8s``, which import it; it imports neither)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from deployments.errors import KeelError, field_errors
from deployments.features.core import FeatureServiceConfig
from deployments.fleet.core import FleetConfig
from deployments.ingress.dataplane.config import IngressConfig
from deployments.llm.config import LLMGatewayConfig
from deployments.observability.slo import SloConfig
from deployments.onnx.core import OnnxModelConfig
from deployments.repository import ModelRepository


def version_problems(repository: ModelRepository | None, model: str, config: OnnxModelConfig,
                     where: str) -> list[str]:
    """The versions a model's config names (``version``, ``traffic``, ``shadow``) that its
    repository does not hold, and a shadow that would be the served version; none when
    the repository is not on this machine."""
    if repository is None or model not in repository.model_names():
        return []
    have = repository.versions(model)
    problems = []
    if config.version is not None and config.version not in have:
        problems.append(f"{where}.version: model {model!r} has no version {config.version!r} "
                        f"(versions: {have})")
    missing = sorted(set(config.traffic or {}) - set(have))
    if missing:
        problems.append(f"{where}.traffic: model {model!r} has no version {missing} "
                        f"(versions: {have})")
    if config.shadow is not None:
        shadow = config.shadow.version
        if shadow not in have:
            problems.append(f"{where}.shadow.version: model {model!r} has no version "
                            f"{shadow!r} (versions: {have})")
        elif config.primary_version is None and shadow == have[-1]:  # unpinned: the latest
            problems.append(f"{where}.shadow.version: {shadow!r} is model {model!r}'s latest "
                            f"version, which it serves; pin 'version' to another one")
    return problems


def fleet_problems(args: Any, repository: ModelRepository | None, where: str) -> list[str]:
    """Each fleet's directory must exist and its members must not be named like a model
    of the repository (unchecked when the repository is not built on this machine: not
    there, or holding no model yet, as in a fresh clone before `keel prepare`)."""
    from graph.app import fleet_directories

    if repository is None or not args.fleets or not repository.model_names():
        return []
    try:
        fleet_directories(args, repository.root, repository.model_names())
    except KeelError as exc:
        return [f"{where}.{exc.message}"]
    return []


#: Ray Serve's default when a deployment does not set max_ongoing_requests.
RAY_DEFAULT_MAX_ONGOING_REQUESTS = 5
#: The user_config model of each deployment by name; every other deployment is a model.
USER_CONFIGS: dict[str, type[BaseModel]] = {"Ingress": IngressConfig,
                                            "FeatureService": FeatureServiceConfig,
                                            "SloMonitor": SloConfig,
                                            "LLMGateway": LLMGatewayConfig}


def check_serve_config(path: Path) -> list[str]:
    """Problems in a serve config, each naming the field; empty when it is sound.

    Checks Ray's own schema, Keel's ``args`` and ``user_config`` models, that no model
    deployment's ``max_ongoing_requests`` caps its batches (ray issue 43288), and that the
    Ingress's sits above Keel's own admission limit (``user_config.max_requests``).
    """
    from ray.serve.schema import ServeDeploySchema

    from graph.app import AppArgs, resolve_repository

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [f"{path}: {exc}"]
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        return field_errors(exc, prefix=f"{path}: ")
    problems: list[str] = grpc_problems(raw)
    grpc_on = grpc_port(raw) is not None
    for a, app in enumerate(schema.applications):
        where = f"applications[{a}] ({app.name})"
        if app.import_path != "graph.app:build_app":
            continue
        try:
            args = AppArgs.model_validate(app.args or {})
        except ValidationError as exc:
            problems += field_errors(exc, prefix=f"{where}.args.")
            args = AppArgs()
        in_ingress = {n for n, place in args.placement.items() if place == "ingress"}
        try:
            repository: ModelRepository | None = ModelRepository(
                resolve_repository(args.model_repository))
        except KeelError:
            repository = None  # not on this machine (an image's path): versions unchecked
        problems += fleet_problems(args, repository, where)
        problems += queue_problems(app.deployments, where)
        for d, dep in enumerate(app.deployments):
            dep_where = f"{where}.deployments[{d}] ({dep.name})"
            fields: dict[str, Any] = dep.model_dump(exclude_unset=True)
            user_config = fields.get("user_config") or {}
            model = FleetConfig if dep.name in args.fleets else USER_CONFIGS.get(
                dep.name, OnnxModelConfig)
            try:
                config = model.model_validate(user_config)
            except ValidationError as exc:
                problems += field_errors(exc, prefix=f"{dep_where}.user_config.")
                continue
            if dep.name in in_ingress:
                problems.append(f"{dep_where}: model {dep.name!r} is placed in the ingress "
                                f"(args.placement); configure it under the Ingress's "
                                f"user_config.models.{dep.name} instead")
                continue
            if isinstance(config, IngressConfig) and grpc_on:
                problems += grpc_ceiling_problems(app.runtime_env or {}, config, where)
            if isinstance(config, IngressConfig):
                for name, embedded in config.models.items():
                    problems += version_problems(
                        repository, name, embedded, f"{dep_where}.user_config.models.{name}")
                stray = sorted(set(config.models) - in_ingress)
                if stray:
                    problems.append(f"{dep_where}.user_config.models: {stray} are not placed "
                                    f"in the ingress (args.placement)")
                ongoing = fields.get("max_ongoing_requests", RAY_DEFAULT_MAX_ONGOING_REQUESTS)
                if ongoing <= config.max_requests:
                    problems.append(
                        f"{dep_where}.max_ongoing_requests: {ongoing} must be above "
                        f"user_config.max_requests ({config.max_requests}): otherwise Ray turns "
                        f"overload away first, in plain text, instead of Keel's JSON 503")
            if isinstance(config, OnnxModelConfig):
                problems += version_problems(repository, dep.name, config,
                                             f"{dep_where}.user_config")
                limit = fields.get("max_ongoing_requests", RAY_DEFAULT_MAX_ONGOING_REQUESTS)
                try:
                    config.check_max_ongoing_requests(limit)
                except KeelError as exc:
                    problems.append(f"{dep_where}: {exc.message}")
    return problems


def queue_problems(deployments: list[Any], where: str) -> list[str]:
    """A deployment the Ingress calls through coalesced handles (a model, a fleet, the
    FeatureService) must let ``max_queued_requests`` hold the Ingress's
    ``calls_in_flight``: Ray's router counts a call as queued until a replica takes it,
    so when calls arrive together it turns the ones past that limit away (503) while the
    replicas still have free slots (ray serve/_private/router.py says so). Each call
    carries up to ``max_batch_size`` requests."""
    ingress = next((d for d in deployments if d.name == "Ingress"), None)
    try:
        config = IngressConfig.model_validate(
            (ingress.model_dump(exclude_unset=True).get("user_config") if ingress else None)
            or {})
    except ValidationError:
        return []  # reported with the Ingress's other fields
    problems: list[str] = []
    for d, dep in enumerate(deployments):
        if dep.name in USER_CONFIGS and dep.name != "FeatureService":
            continue
        queued = dep.model_dump(exclude_unset=True).get("max_queued_requests", -1)
        if queued != -1 and queued < config.calls_in_flight:
            problems.append(
                f"{where}.deployments[{d}] ({dep.name}).max_queued_requests: {queued} is "
                f"below the Ingress's user_config.calls_in_flight ({config.calls_in_flight}): "
                f"Ray counts a call as queued until a replica takes it, so calls sent together "
                f"would be turned away (503) while its replicas have free slots; set it to at "
                f"least {config.calls_in_flight}, or leave it unset")
    return problems


#: Ray Serve's gRPC port when ``grpc_options`` names none.
DEFAULT_GRPC_PORT = 9000


def grpc_port(config: dict[str, Any]) -> int | None:
    """The port Serve's gRPC ingress listens on, or ``None`` when the config registers no
    servicer function (Serve then runs no gRPC server)."""
    grpc = config.get("grpc_options") or {}
    if not grpc.get("grpc_servicer_functions"):
        return None
    return int(grpc.get("port", DEFAULT_GRPC_PORT))


def grpc_problems(raw: dict[str, Any]) -> list[str]:
    """``grpc_options``: every servicer function importable and callable, and a port of
    its own (Ray would only find out when a replica starts its gRPC server)."""
    from ray._common.utils import import_attr

    grpc = raw.get("grpc_options") or {}
    problems: list[str] = []
    for i, path in enumerate(grpc.get("grpc_servicer_functions") or []):
        try:
            function = import_attr(path)
        except (ImportError, AttributeError, ValueError) as exc:
            problems.append(f"grpc_options.grpc_servicer_functions[{i}]: cannot import "
                            f"{path!r} ({exc.__class__.__name__}: {exc})")
            continue
        if not callable(function):
            problems.append(f"grpc_options.grpc_servicer_functions[{i}]: {path!r} is not a "
                            f"function")
    port = grpc_port(raw)
    if port is not None and port == (raw.get("http_options") or {}).get("port", 8000):
        problems.append(f"grpc_options.port: {port} is also http_options.port; gRPC needs "
                        f"a port of its own")
    return problems


#: The environment variable Serve's gRPC servers read their message ceiling from.
GRPC_CEILING_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"


def grpc_ceiling_problems(runtime_env: dict[str, Any], ingress: IngressConfig,
                          where: str) -> list[str]:
    """The application's gRPC message ceiling must be set, and not below the Ingress's
    ``max_body_bytes`` (Ray's default, 2 GiB, would read any message in full first)."""
    field = f"{where}.runtime_env.env_vars.{GRPC_CEILING_ENV}"
    value = (runtime_env.get("env_vars") or {}).get(GRPC_CEILING_ENV)
    suggested = ingress.max_body_bytes + 64 * 1024
    if value is None:
        return [f"{field}: not set; gRPC is on, so set it to the Ingress's max_body_bytes "
                f"+ 64 KiB ({suggested})"]
    try:
        ceiling = int(value)
    except (TypeError, ValueError):
        return [f"{field}: {value!r} is not a number of bytes"]
    if ceiling < ingress.max_body_bytes:
        return [f"{field}: {ceiling} is below the Ingress's max_body_bytes "
                f"({ingress.max_body_bytes}); set it to {suggested}"]
    return []
