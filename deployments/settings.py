"""Secrets and addresses: read from the environment inside each replica.

Never from serve_config.yaml (which is checked in and rendered into manifests):
these are the third of Keel's three disjoint sets of configuration names.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class RedisSettings(BaseSettings):
    """Where the prediction cache lives. ``rediss://`` URLs turn TLS on."""

    model_config = SettingsConfigDict(env_prefix="KEEL_REDIS_", extra="ignore")

    #: ``redis://host:port/db`` or ``rediss://...``; empty: no Redis, in-process cache only.
    url: str = "redis://127.0.0.1:6379/0"
    password: SecretStr | None = None
    #: CA bundle for ``rediss://`` (optional; the system store is used otherwise).
    ssl_ca_certs: str | None = None
    #: Per-command timeout: a slow Redis must cost a cache miss, not a slow answer.
    socket_timeout_s: float = Field(default=0.1, gt=0)
    #: Includes the TLS handshake for ``rediss://``, which took over 0.2 s on a busy host.
    connect_timeout_s: float = Field(default=0.5, gt=0)


class AuthSettings(BaseSettings):
    """Who may call the ingress (deployments/ingress/auth.py checks the values)."""

    model_config = SettingsConfigDict(env_prefix="KEEL_", extra="ignore")

    #: ``on`` or ``off``.
    auth: str = "off"
    #: A JSON list of key entries (``keel hash-key`` prints one).
    api_keys: SecretStr = SecretStr("")
    #: A file with the same list, JSON or YAML.
    api_keys_file: str = ""


class TracingSettings(BaseSettings):
    """Where spans go, under OpenTelemetry's own variable names (the SDK reads the rest
    of ``OTEL_EXPORTER_OTLP_*`` and ``OTEL_BSP_*`` itself)."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore")

    #: Used as given; wins over the generic endpoint.
    exporter_otlp_traces_endpoint: str = ""
    #: ``/v1/traces`` is appended.
    exporter_otlp_endpoint: str = ""
    #: Each replica's service name is ``<this or keel>.<deployment>``.
    service_name: str = ""
    #: Kept, with Keel's attributes appended.
    resource_attributes: str = ""

    def traces_endpoint(self) -> str | None:
        """The OTLP/HTTP traces URL, or ``None`` (tracing stays off)."""
        traces = self.exporter_otlp_traces_endpoint.strip()
        if traces:
            return traces
        generic = self.exporter_otlp_endpoint.strip()
        return generic.rstrip("/") + "/v1/traces" if generic else None


class ProfilingSettings(BaseSettings):
    """The Pyroscope server continuous profiles go to; no address, no profiling."""

    model_config = SettingsConfigDict(env_prefix="PYROSCOPE_", extra="ignore",
                                      populate_by_name=True)

    #: ``KEEL_PYROSCOPE_ADDRESS`` wins over ``PYROSCOPE_SERVER_ADDRESS``.
    address: str = Field(default="", validation_alias=AliasChoices(
        "KEEL_PYROSCOPE_ADDRESS", "PYROSCOPE_SERVER_ADDRESS"))
    application_name: str = "keel"
    #: Samples per second.
    sample_rate: int = Field(default=100, gt=0)
    basic_auth_user: str = ""
    basic_auth_password: SecretStr = SecretStr("")
    tenant_id: str = ""


class RepositorySettings(BaseSettings):
    """Where replicas find the model and feature repositories (each wins over the
    application's ``args``, for images that bake them in at another path)."""

    model_config = SettingsConfigDict(env_prefix="KEEL_", extra="ignore")

    model_repository: str = ""
    feature_repo: str = ""
    #: The feature_store.yaml inside the feature repository.
    feature_store_yaml: str = ""


class LLMSettings(BaseSettings):
    """An LLM upstream's API key, sent as ``Authorization: Bearer``.

    Read from the variable the upstream's ``api_key_env`` names: ``KEEL_LLM_API_KEY``
    unless its config names another (``OPENAI_API_KEY``...), which ``reading`` reads.
    """

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True,
                                      extra="ignore")

    #: Unset or empty: the upstream gets no Authorization header.
    api_key: SecretStr | None = Field(default=None, validation_alias="KEEL_LLM_API_KEY")

    @classmethod
    def reading(cls, variable: str) -> LLMSettings:
        """The settings with ``api_key`` read from the environment variable ``variable``."""
        from pydantic import create_model

        named = create_model(cls.__name__, __base__=cls, api_key=(
            SecretStr | None, Field(default=None, validation_alias=variable)))
        return named()


class CloudWatchSettings(BaseSettings):
    """Keel's metrics to Amazon CloudWatch as well (off by default); checked when a replica
    starts by ``deployments.observability.cloudwatch.parse_settings`` (a malformed value
    refuses the start with a ``ConfigError`` naming the variable)."""

    model_config = SettingsConfigDict(env_prefix="KEEL_CLOUDWATCH_", extra="ignore")

    #: ``off``, ``emf`` (Embedded Metric Format lines to stdout or ``emf_file``) or
    #: ``put_metric_data`` (the CloudWatch API through boto3).
    sink: str = "off"
    namespace: str = "Keel"
    #: Comma list: ``application``, ``deployment``, ``tags`` (all of a metric's own tags)
    #: or single tag names (``model``, ``http_route``...).
    dimensions: str = "application,tags"
    #: A coarser dimension set also written for counters and histograms (empty: none).
    rollup_dimensions: str = "application"
    #: Comma list of ``metric=Unit`` overriding the unit taken from the metric's name.
    units: str = ""
    flush_interval_s: float = 60.0
    #: The EMF sink's file (appended to); empty: stdout.
    emf_file: str = ""
    #: boto3's region (empty: its own chain, ``AWS_REGION``...) and endpoint.
    region: str = ""
    endpoint_url: str = ""
    #: Connect and read timeout of one PutMetricData call.
    timeout_s: float = 5.0
