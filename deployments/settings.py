"""Secrets and addresses: read from the environment inside each replica.

Never from serve_config.yaml (which is checked in and rendered into manifests):
these are the third of Keel's three disjoint sets of configuration names.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
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
