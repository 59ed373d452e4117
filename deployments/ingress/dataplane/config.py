"""The ingress's live knobs (``IngressConfig``, its ``user_config``) and the server's name."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from pydantic import BaseModel, ConfigDict, Field

from deployments.cache.policy import CacheConfig
from deployments.features.rowcache import FeatureCacheConfig
from deployments.ingress.rollout.payload_log import PayloadLogConfig
from deployments.onnx.core import OnnxModelConfig

SERVER_NAME = "keel"


def server_version() -> str:
    try:
        return package_version("keel")
    except PackageNotFoundError:
        return "0.0.0"


class IngressConfig(BaseModel):
    """Live knobs of the ingress (its ``user_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Larger bodies get 413 before they are read in full.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    #: A request's time budget in the ingress: each stage (feature lookup, model call)
    #: gets what is left of it; past it the request answers 504 naming the stage, and the
    #: stage's work is cancelled. Keep it below ``http_options.request_timeout_s``.
    request_timeout_s: float = Field(default=30.0, gt=0, le=600)
    #: How long the ingress trusts its copy of a model's status (served version, spec).
    status_ttl_s: float = Field(default=1.0, ge=0, le=300)
    #: Longest wait for each model (and for the warm-up) in ``/v2/health/ready``.
    ready_timeout_s: float = Field(default=2.0, gt=0, le=60)
    #: Most entities one ``/v1/decide`` request may name.
    max_entities: int = Field(default=256, ge=1, le=100_000)
    #: Keel's request metrics and SLO events (turn off only to measure what they cost).
    metrics: bool = True
    #: How often this replica sends its SLO events to the SloMonitor.
    slo_push_interval_s: float = Field(default=1.0, gt=0, le=60)
    #: The prediction cache (TTL, hash, fallback size, policy per model); applied live.
    cache: CacheConfig = Field(default_factory=CacheConfig)
    #: The feature rows ``/v1/decide`` may reuse without asking the FeatureService.
    features: FeatureCacheConfig = Field(default_factory=FeatureCacheConfig)
    #: Live config of each model placed in the ingress (``args.placement``): version,
    #: max_batch_size, ONNX Runtime options, as an ``OnnxModel``'s user_config.
    models: dict[str, OnnxModelConfig] = Field(default_factory=dict)
    #: Inference and decision requests (REST and gRPC) this replica holds at once; more
    #: are answered at once with 503 ``{"error": ...}`` and Retry-After (gRPC: UNAVAILABLE
    #: with ``retry-after``). Keep the deployment's ``max_ongoing_requests`` above it, or
    #: Ray turns requests away first, in plain text (``keel check-config`` refuses that).
    max_requests: int = Field(default=1280, ge=1, le=1_000_000)
    #: Most requests one coalesced call carries to a model deployment or the store.
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    #: A call to a model deployment that has not answered after this many seconds is sent
    #: again beside the first (and again each time as long passes, 4 attempts at most; the
    #: first answer wins); one whose replica died under it is sent again at once.
    #: ``None``: only the latter. Keep it well above the model's p99 under load, and three
    #: times it below ``request_timeout_s``.
    model_call_retry_s: float | None = Field(default=5.0, gt=0, le=600)
    #: Shadow copies (a model's ``shadow``) waiting for their shadow call in this replica;
    #: more are dropped and counted (``keel_shadow_dropped_total``), never waited for.
    #: 0 turns mirroring off here.
    shadow_queue: int = Field(default=1024, ge=0, le=1_000_000)
    #: Payload logging: a sample of answered requests appended to a Redis Stream.
    payloads: PayloadLogConfig = PayloadLogConfig()
    #: Handle calls running at once per model deployment (and to the FeatureService);
    #: requests arriving meanwhile queue into the next call. A model deployment's
    #: autoscaler counts these calls as its ongoing requests.
    calls_in_flight: int = Field(default=4, ge=1, le=256)
