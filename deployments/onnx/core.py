"""ONNX Runtime sessions and batched prediction on numpy arrays (no Ray here).

``OnnxRunner`` owns one session for one version of one model. It checks the
model file against its ``model.yaml`` when it loads, so a mismatch fails at
start-up with a message naming the tensor, never on the first request.
``predict_batch`` stacks the rows of several requests into one ONNX Runtime call
and splits the answer back, so micro-batching costs one session call per batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from deployments.contracts import InferCall, InferResult, ModelStatus, Shadow
from deployments.errors import ConfigError, InvalidInput, KeelError, ModelNotFound, ModelNotReady
from deployments.repository import (
    ORT_TYPES,
    ModelRepository,
    ModelSpec,
    TensorSpec,
    check_traffic,
    version_key,
)

log = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class RuntimeOptions(BaseModel):
    """ONNX Runtime session options. Changing any of them reloads the session."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Threads inside one operator; 0 lets ONNX Runtime choose (all cores).
    #: 1 suits small models with several replicas on few cores.
    intra_op_num_threads: int = Field(default=1, ge=0, le=256)
    inter_op_num_threads: int = Field(default=1, ge=0, le=256)
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    #: Execution providers in order of preference; ``None``: CUDA when present, else CPU.
    providers: list[str] | None = None


class OnnxModelConfig(BaseModel):
    """The live knobs of an ``OnnxModel`` deployment (its ``user_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Version to serve; ``None`` serves the latest version in the repository (with
    #: ``traffic``: the version with the largest weight).
    version: str | None = None
    #: A weighted split between versions, e.g. ``{"1": 95, "2": 5}``: every version named
    #: is kept loaded, and the ingress sends each request that pins no version to one of
    #: them in proportion to its weight (sticky per route key). A weight of 0 keeps a
    #: version loaded for pinned requests only. ``None``: every request to ``version``.
    traffic: dict[str, float] | None = None
    #: A version that gets a copy of the requests that pin no version (``fraction`` of
    #: them), after their answer: compared with the live answer, never returned or cached.
    #: Kept loaded; it must not be the served version or one the split sends traffic to.
    shadow: Shadow | None = None
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    #: How long a batch waits to fill. At low load this is pure latency: size it to the SLO.
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=1.0)
    runtime: RuntimeOptions = Field(default_factory=RuntimeOptions)

    @model_validator(mode="after")
    def _version_name(self) -> OnnxModelConfig:
        if self.version is not None and not self.version.strip():
            raise ValueError("version must not be empty")
        return self

    @field_validator("traffic")
    @classmethod
    def _routable(cls, traffic: dict[str, float] | None,
                  info: ValidationInfo) -> dict[str, float] | None:
        if traffic is None:
            return None
        check_traffic(traffic)
        version = info.data.get("version")
        if version is not None and version not in traffic:
            raise ValueError(f"names versions {sorted(traffic)} but not the served version "
                             f"{version!r}; add it (weight 0 keeps it loaded without "
                             f"traffic) or drop 'version'")
        return traffic

    @field_validator("shadow")
    @classmethod
    def _not_live(cls, shadow: Shadow | None, info: ValidationInfo) -> Shadow | None:
        if shadow is None:
            return None
        traffic = info.data.get("traffic") or {}
        if shadow.version == info.data.get("version") or traffic.get(shadow.version, 0) > 0:
            raise ValueError(f"version {shadow.version!r} is live (it answers requests); a "
                             f"shadow must be a version that does not")
        return shadow

    @property
    def primary_version(self) -> str | None:
        """The version status reports as served: ``version``, else the heaviest in
        ``traffic`` (ties: the newest), else ``None`` (the latest in the repository)."""
        if self.version is not None or not self.traffic:
            return self.version
        return max(self.traffic, key=lambda v: (self.traffic[v], version_key(v)))  # type: ignore[index]

    def check_max_ongoing_requests(self, max_ongoing_requests: int | None) -> None:
        """Refuse a replica limit below the batch size.

        Ray Serve never hands a replica more than ``max_ongoing_requests`` requests
        at once, so a smaller limit silently caps every batch (ray issue 43288).
        """
        if max_ongoing_requests is not None and max_ongoing_requests < self.max_batch_size:
            raise ConfigError(
                f"max_ongoing_requests ({max_ongoing_requests}) is smaller than "
                f"user_config.max_batch_size ({self.max_batch_size}): every batch would be "
                f"capped at {max_ongoing_requests}; raise max_ongoing_requests to at least "
                f"{self.max_batch_size}"
            )


def available_providers(preferred: Sequence[str] | None) -> list[str]:
    """The execution providers to ask for: the preferred ones this build has, CPU last."""
    have = ort.get_available_providers()
    wanted = list(preferred) if preferred else ["CUDAExecutionProvider"]
    chosen = [p for p in wanted if p in have and p != "CPUExecutionProvider"]
    if preferred and not chosen and "CPUExecutionProvider" not in preferred:
        raise ConfigError(f"none of the execution providers {list(preferred)} is available "
                          f"(this onnxruntime has {have})")
    return [*chosen, "CPUExecutionProvider"]


class OnnxRunner:
    """One ONNX Runtime session for one model version, with its declared spec."""

    def __init__(self, spec: ModelSpec, model_path: Path, options: RuntimeOptions) -> None:
        self.spec = spec
        self.options = options
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_num_threads
        session_options.inter_op_num_threads = options.inter_op_num_threads
        session_options.graph_optimization_level = _OPT_LEVELS[options.graph_optimization_level]
        try:
            self.session = ort.InferenceSession(
                str(model_path),
                sess_options=session_options,
                providers=available_providers(options.providers),
            )
        except KeelError:
            raise
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConfigError(f"model {spec.name!r} version {spec.version!r}: "
                              f"ONNX Runtime cannot load {str(model_path)!r}: {exc}") from exc
        self._check_against_session()
        self._output_names = [t.name for t in spec.outputs]
        self._batched = all(t.batched for t in spec.inputs)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def _check_against_session(self) -> None:
        where = f"model {self.spec.name!r} version {self.spec.version!r}"
        session_inputs = {i.name: i for i in self.session.get_inputs()}
        declared = {t.name for t in self.spec.inputs}
        if set(session_inputs) != declared:
            raise ConfigError(f"{where}: model.yaml declares inputs {sorted(declared)} but the "
                              f"ONNX model takes {sorted(session_inputs)}")
        session_outputs = {o.name: o for o in self.session.get_outputs()}
        for tensors, actual, kind in (
            (self.spec.inputs, session_inputs, "input"),
            (self.spec.outputs, session_outputs, "output"),
        ):
            for tensor in tensors:
                node = actual.get(tensor.name)
                if node is None:
                    raise ConfigError(f"{where}: {kind} {tensor.name!r} is not in the ONNX model "
                                      f"(it has {sorted(actual)})")
                datatype = ORT_TYPES.get(node.type)
                if datatype != tensor.datatype:
                    raise ConfigError(f"{where}: {kind} {tensor.name!r} is {tensor.datatype} in "
                                      f"model.yaml but {node.type} in the ONNX model")
                _check_dims(where, kind, tensor, list(node.shape))

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """Cheap structural check (names, dtype, rank, fixed dims) before touching ORT."""
        if set(inputs) != {t.name for t in self.spec.inputs}:
            raise InvalidInput(f"model {self.name!r} version {self.version!r} takes inputs "
                               f"{[t.name for t in self.spec.inputs]}, got {sorted(inputs)}")
        for tensor in self.spec.inputs:
            array = inputs[tensor.name]
            if array.dtype != tensor.numpy_dtype:
                raise InvalidInput(f"input {tensor.name!r}: expected {tensor.datatype}, "
                                   f"got numpy {array.dtype}")
            if array.ndim != len(tensor.shape) or any(
                d != -1 and d != a for d, a in zip(tensor.shape, array.shape, strict=True)
            ):
                raise InvalidInput(f"input {tensor.name!r}: shape {list(array.shape)} does not "
                                   f"match the declared {tensor.shape}")

    def predict(self, inputs: dict[str, np.ndarray],
                outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one request. ``outputs`` picks a subset of the declared outputs."""
        self.check_inputs(inputs)
        names = self._select_outputs(outputs)
        answer = self._run(inputs)
        return {name: answer[name] for name in names}

    def predict_batch(
        self, requests: Sequence[dict[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray] | KeelError]:
        """Answer several requests with as few session calls as possible.

        Requests whose inputs have the same trailing dimensions are stacked along
        the first axis into one call; each answer is the slice of its own rows.
        A request that fails is answered with its error and never fails the others.
        """
        results: list[dict[str, np.ndarray] | KeelError] = [
            InvalidInput("not computed") for _ in requests
        ]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, inputs in enumerate(requests):
            try:
                self.check_inputs(inputs)
            except KeelError as exc:
                results[i] = exc
                continue
            if not self._batched:
                groups[("single", i)] = [i]
                continue
            key = tuple((name, inputs[name].shape[1:]) for name in sorted(inputs))
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            self._run_group(requests, members, results)
        return results

    def _run_group(self, requests: Sequence[dict[str, np.ndarray]], members: list[int],
                   results: list[dict[str, np.ndarray] | KeelError]) -> None:
        if len(members) == 1:
            i = members[0]
            try:
                results[i] = self._run(requests[i])
            except KeelError as exc:
                results[i] = exc
            return
        stacked = {
            t.name: np.concatenate([requests[i][t.name] for i in members], axis=0)
            for t in self.spec.inputs
        }
        try:
            merged = self._run(stacked)
        except KeelError:
            # One bad request must not fail its neighbours: answer each on its own.
            for i in members:
                self._run_group(requests, [i], results)
            return
        start = 0
        first = self.spec.inputs[0].name
        for i in members:
            rows = requests[i][first].shape[0]
            results[i] = {name: value[start:start + rows] for name, value in merged.items()}
            start += rows

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.spec.batch_invariant and self._batched:
            rows = next(iter(inputs.values())).shape[0]
            if rows > 1:
                parts = [self._run_session({k: v[i:i + 1] for k, v in inputs.items()})
                         for i in range(rows)]
                return {name: np.concatenate([p[name] for p in parts], axis=0)
                        for name in self._output_names}
        return self._run_session(inputs)

    def _run_session(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self._output_names, inputs)
        except Exception as exc:  # ORT's errors carry no type we could match
            raise InvalidInput(f"model {self.name!r} rejected the input: {exc}") from exc
        return dict(zip(self._output_names, values, strict=True))

    def _select_outputs(self, outputs: Sequence[str] | None) -> list[str]:
        if not outputs:
            return list(self._output_names)
        for name in outputs:
            if name not in self._output_names:
                raise InvalidInput(f"output {name!r} is not an output of model {self.name!r} "
                                   f"(it has {self._output_names})")
        return list(outputs)


def _check_dims(where: str, kind: str, tensor: TensorSpec, actual: list[Any]) -> None:
    if len(actual) != len(tensor.shape):
        raise ConfigError(f"{where}: {kind} {tensor.name!r} has rank {len(tensor.shape)} in "
                          f"model.yaml but {len(actual)} in the ONNX model")
    for declared, real in zip(tensor.shape, actual, strict=True):
        # ORT reports symbolic dims as strings or None: anything goes there.
        if isinstance(real, int) and real >= 0 and declared not in (-1, real):
            raise ConfigError(f"{where}: {kind} {tensor.name!r} shape {tensor.shape} in "
                              f"model.yaml conflicts with {actual} in the ONNX model")


def load_runner(repository: ModelRepository, name: str, version: str | None,
                options: RuntimeOptions) -> OnnxRunner:
    """Load one version (the latest when ``None``) of a model from the repository."""
    version = version or repository.latest_version(name)
    spec = repository.spec(name, version)
    started = time.perf_counter()
    runner = OnnxRunner(spec, repository.model_path(name, version), options)
    log.info("loaded model %s version %s on %s in %.1f ms", name, version, runner.providers,
             (time.perf_counter() - started) * 1000)
    return runner


class ModelVersions:
    """The runners of one model: the served version, the other versions its traffic
    split (and its shadow) names, and the served version it replaced.

    Swapping keeps the previous runner loaded so requests pinned to it, and
    batches already running on it, finish on the version they asked for.
    """

    def __init__(self, repository: ModelRepository, name: str) -> None:
        self.repository = repository
        self.name = name
        self.current: OnnxRunner | None = None
        self.previous: OnnxRunner | None = None
        #: The split's other versions (not ``current``), by version.
        self.others: dict[str, OnnxRunner] = {}
        #: The split as configured (``{}``: every request to ``current``).
        self.traffic: dict[str, float] = {}
        #: The version mirrored to (loaded among ``others``), if any.
        self.shadow: Shadow | None = None

    def apply(self, config: OnnxModelConfig) -> bool:
        """Load what ``config`` asks for; returns True when the served runner changed.

        Every version first, then one assignment each: a failure to load any of them
        (a version not in the repository, a broken file) changes nothing.
        """
        version = config.primary_version or self.repository.latest_version(self.name)
        shadow = config.shadow.version if config.shadow else None
        if shadow == version:
            raise ConfigError(f"shadow: version {shadow!r} of model {self.name!r} is the "
                              f"served version; a shadow must be a version that does not "
                              f"answer requests")
        wanted = [version, *(v for v in (config.traffic or {}) if v != version)]
        if shadow is not None and shadow not in wanted:
            wanted.append(shadow)
        have = self.loaded()
        runners: dict[str, OnnxRunner] = {}
        for v in wanted:
            known = have.get(v)
            if known is not None and known.options == config.runtime:
                runners[v] = known
                continue
            try:
                runners[v] = load_runner(self.repository, self.name, v, config.runtime)
            except ModelNotFound as exc:
                if v == shadow and v not in (config.traffic or {}):
                    raise ConfigError(f"shadow: version {v!r} of model {self.name!r} cannot "
                                      f"be loaded: {exc.message}") from exc
                if v == config.version or config.traffic is None:
                    raise
                raise ConfigError(f"traffic: version {v!r} of model {self.name!r} cannot be "
                                  f"loaded: {exc.message}") from exc
        current = self.current
        runner = runners.pop(version)
        changed = current is not runner
        if current is not None and current.version != version and current.version not in runners:
            self.previous = current
        elif self.previous is not None and (self.previous.version == version
                                            or self.previous.version in runners):
            self.previous = None
        changed = changed or set(self.others) != set(runners) or any(
            self.others[v] is not r for v, r in runners.items())
        self.others = runners
        self.traffic = dict(config.traffic or {})
        self.shadow = config.shadow
        self.current = runner
        return changed

    def runner_for(self, version: str | None) -> OnnxRunner:
        """The runner for a pinned version, or the served one."""
        current = self.current
        if current is None:
            raise ModelNotReady(f"model {self.name!r} is not loaded yet")
        if version is None or version == current.version:
            return current
        other = self.others.get(version)
        if other is not None:
            return other
        previous = self.previous
        if previous is not None and previous.version == version:
            return previous
        known = self.repository.versions(self.name) if self.repository.root.is_dir() else []
        if version in known:
            raise ModelNotFound(f"model {self.name!r} version {version!r} is in the repository "
                                f"but not loaded (serving {current.version!r})",
                                serving=current.version)
        raise ModelNotFound(f"model {self.name!r} has no version {version!r}")

    def infer_batch(self, calls: Sequence[InferCall]) -> list[InferResult | KeelError]:
        """Answer the calls of one micro-batch: one ONNX Runtime call per version asked for.

        Each call gets its own result or its own error; the version in a result is the
        one that computed it (a call may pin a version, see ``runner_for``).
        """
        started = time.perf_counter()
        results: list[InferResult | KeelError] = [ModelNotReady("not computed")] * len(calls)
        groups: dict[int, tuple[OnnxRunner, list[int]]] = {}
        for i, call in enumerate(calls):
            try:
                runner = self.runner_for(call.version)
            except KeelError as exc:
                results[i] = exc
                continue
            groups.setdefault(id(runner), (runner, []))[1].append(i)
        for runner, members in groups.values():
            answers = runner.predict_batch([calls[i].inputs for i in members])
            elapsed_ms = (time.perf_counter() - started) * 1000
            for i, answer in zip(members, answers, strict=True):
                if isinstance(answer, KeelError):
                    results[i] = answer
                    continue
                wanted = calls[i].outputs
                outputs = {k: v for k, v in answer.items() if not wanted or k in wanted}
                results[i] = InferResult(model_name=self.name, model_version=runner.version,
                                         outputs=outputs, batch_size=len(members),
                                         model_ms=elapsed_ms)
        return results

    def status(self) -> ModelStatus:
        """What is loaded and served; the ingress validates requests against it."""
        loaded = self.loaded()
        current = self.current
        try:
            available = self.repository.versions(self.name)
        except KeelError:
            available = sorted(loaded)
        return ModelStatus(
            name=self.name,
            served_version=current.version if current else None,
            loaded={v: r.spec for v, r in loaded.items()},
            available_versions=available,
            providers=current.providers if current else [],
            traffic=self.traffic,
            shadow=self.shadow,
        )

    def loaded(self) -> dict[str, OnnxRunner]:
        runners = [r for r in (self.previous, *self.others.values(), self.current)
                   if r is not None]
        return {r.version: r for r in runners}
