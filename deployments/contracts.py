"""Pydantic contracts that cross a process boundary.

The Open Inference Protocol (KServe V2) JSON shapes, and the calls the ingress
makes on model deployments through Ray handles.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from deployments.repository import ModelSpec

# The cache-status vocabulary, defined once: the contracts, the metrics' ``result`` label,
# the ``X-Keel-Cache`` header, the gRPC ``cache`` parameter and span attributes use it.

#: What a prediction-cache lookup made of one row: hit (from the cache), miss (computed
#: for this request), shared (computed by a concurrent identical request).
CacheStatus = Literal["hit", "miss", "shared"]
#: A row's status in an answer: a lookup's, or off (the cache was not used).
RowCache = Literal["hit", "miss", "shared", "off"]
#: One word for a whole request: hit (no row computed for it), miss (every row computed
#: for it), partial, or off.
RequestCache = Literal["hit", "miss", "partial", "off"]

# --- Open Inference Protocol (REST) -------------------------------------------------


class RequestInput(BaseModel):
    """One input tensor of an inference request."""

    model_config = ConfigDict(extra="allow")

    name: str
    #: Strict: JSON integers only (no true for 1, no 1e9 or "4" coerced to an integer).
    shape: list[StrictInt]
    datatype: str
    parameters: dict[str, Any] | None = None
    #: Row-major flattened (nested lists are accepted too); absent when the
    #: tensor travels in the binary tensor data extension.
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    """An output the client asks for; parameters such as ``binary_data`` ride along."""

    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """``POST /v2/models/{name}[/versions/{v}]/infer`` body."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    """One output tensor of an inference response."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    """The answer to an inference request."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    """A tensor as the metadata endpoints describe it."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}[/versions/{v}]``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = None


class ServerMetadata(BaseModel):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


# --- ingress -> model deployment ------------------------------------------------------


class InferCall(BaseModel):
    """What the ingress sends to an ``OnnxModel`` for one request (already validated)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inputs: dict[str, np.ndarray]
    #: Pin a version; ``None`` means the version the deployment serves now.
    version: str | None = None
    #: Outputs to compute; ``None`` means all declared outputs.
    outputs: list[str] | None = None
    #: W3C trace context (``traceparent``/``tracestate``) of the caller's span, set only
    #: when the request is traced: the model's batch span links to it. Ray Serve carries
    #: the parent context itself; this is for the requests a batch serves beyond its first.
    trace: dict[str, str] | None = None


class InferResult(BaseModel):
    """The model's outputs, and the version that actually computed them."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    #: How many requests shared the ONNX Runtime call that answered this one.
    batch_size: int = 1
    model_ms: float = 0.0


class Shadow(BaseModel):
    """A version that gets a copy of live traffic after the answer (a model's
    ``user_config.shadow``): its answers are compared with the live ones, never returned,
    never cached."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                         description="The version to mirror requests to (kept loaded)")
    #: Share of the requests that pin no version which are also sent to the shadow.
    fraction: float = Field(default=1.0, ge=0.0, le=1.0)


class ModelStatus(BaseModel):
    """A model deployment's view of itself: what is loaded and which version is served."""

    name: str
    served_version: str | None
    loaded: dict[str, ModelSpec]
    available_versions: list[str]
    providers: list[str] = Field(default_factory=list)
    error: str | None = None
    #: The weighted split between loaded versions (``{}``: every request to the served
    #: version); the ingress picks a version per request from it.
    traffic: dict[str, float] = Field(default_factory=dict)
    #: The version mirrored to after each answer (``None``: no shadow).
    shadow: Shadow | None = None


# --- the decision API (/v1/decide) ----------------------------------------------------

#: An entity's key fields, e.g. {"symbol": "SYM001", "account_id": "ACC0042"}.
EntityKey = dict[str, Any]


class DecideRequest(BaseModel):
    """``POST /v1/decide``: score entities with a model over their features from Feast."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="A model served here, e.g. risk_mlp")
    #: Pin a version; absent: the version served now.
    version: str | None = Field(default=None, min_length=1)
    entities: list[EntityKey] = Field(
        min_length=1,
        description="Entity keys; every key field the model's feature views join on "
                    "(the demo: symbol and account_id). At most the ingress's max_entities.",
    )


class DecideTimings(BaseModel):
    """Where the request's time went, in milliseconds (shared by all its results)."""

    features: float
    cache: float
    model: float
    total: float


class Decision(BaseModel):
    """One entity's answer."""

    entity: EntityKey
    score: float
    #: ``score >= threshold`` of the model's decision rule (model.yaml).
    decision: bool
    threshold: float
    model: str
    model_version: str
    #: See :data:`RowCache` (off: the cache is disabled or unreachable for this model).
    cache: RowCache
    timings_ms: DecideTimings


class DecideResponse(BaseModel):
    """The answer to ``POST /v1/decide``: one result per entity, in request order."""

    model: str
    model_version: str
    results: list[Decision]
    timings_ms: DecideTimings

