"""API-key authentication of the ingress. No Ray here.

Keys are stored as the SHA-256 of the key (hex), never in plain text. SHA-256 rather
than scrypt/PBKDF2 because Keel's keys are long random tokens (``keel hash-key --new``
makes 32 random bytes): a slow KDF protects guessable passwords, adds nothing against
a 256-bit search, and would cost every request milliseconds of CPU.

Configuration (environment of the ingress replica):

* ``KEEL_AUTH``: ``off`` (default) or ``on``.
* ``KEEL_API_KEYS``: a JSON list of ``{name, sha256, tenant?, models?}``; ``models`` is a
  list of model names or ``["*"]`` (the default: every model).
* ``KEEL_API_KEYS_FILE``: a file (e.g. a mounted Secret) holding the same list as JSON or
  YAML. Both may be set; their keys are merged (names must be unique).

A request presents its key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
The presented key is hashed and compared with *every* stored hash through
``hmac.compare_digest``. Keys are never logged nor echoed; messages name a key's name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from deployments.errors import ConfigError, Forbidden, Unauthorized, field_errors
from deployments.settings import AuthSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as far as a log may say: the API key's name and tenant."""

    key: str | None = None
    tenant: str | None = None


#: The authenticated caller of the request being served (set where the key is checked;
#: ``None`` with authentication off).
current_caller: ContextVar[Caller | None] = ContextVar("keel_caller", default=None)

#: Where the authenticated key (an ``ApiKey``) is left in the ASGI scope.
API_KEY_SCOPE_KEY = "keel.api_key"
#: Routes that answer without a key: the probes and the server metadata. (``/docs`` and
#: ``/openapi.json`` are not API routes and carry no data; they stay open too.)
EXEMPT_ROUTES = frozenset({"/v2", "/v2/health/live", "/v2/health/ready"})
ALL_MODELS = "*"


class ApiKey(BaseModel):
    """One stored key: its name, the SHA-256 of the key, its tenant and its models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    tenant: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    models: tuple[str, ...] = Field(default=(ALL_MODELS,), min_length=1)

    def allows(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models


_KEYS = TypeAdapter(list[ApiKey])


@dataclass(frozen=True)
class AuthConfig:
    """Whether keys are required, and the stored keys."""

    enabled: bool = False
    keys: tuple[ApiKey, ...] = ()


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key: what ``KEEL_API_KEYS`` stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(raw: Any, source: str) -> list[ApiKey]:
    """Validate a list of key entries; a ``ConfigError`` names the source and the field."""
    try:
        return _KEYS.validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(field_errors(exc, limit=5))) from exc


def load_auth(settings: AuthSettings | None = None) -> AuthConfig:
    """The auth configuration from the environment; refuses (``ConfigError``) anything
    malformed, and ``KEEL_AUTH=on`` without a key."""
    settings = settings or AuthSettings()
    mode = settings.auth.strip().lower() or "off"
    if mode not in ("on", "off"):
        raise ConfigError(f"KEEL_AUTH: expected 'on' or 'off' (got {mode!r})")
    keys: list[ApiKey] = []
    text = settings.api_keys.get_secret_value().strip()
    if text:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"KEEL_API_KEYS: not valid JSON ({exc.__class__.__name__})") \
                from exc
        keys += parse_keys(raw, "KEEL_API_KEYS")
    path = settings.api_keys_file.strip()
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"KEEL_API_KEYS_FILE {path}: cannot read it "
                              f"({exc.__class__.__name__})") from exc
        keys += parse_keys(raw, f"KEEL_API_KEYS_FILE {path}")
    names = [k.name for k in keys]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"KEEL_API_KEYS: duplicate key names {duplicates}")
    if mode == "on" and not keys:
        raise ConfigError("KEEL_AUTH=on but no key is configured "
                          "(set KEEL_API_KEYS or KEEL_API_KEYS_FILE)")
    return AuthConfig(enabled=mode == "on", keys=tuple(keys))


def announce(config: AuthConfig) -> None:
    """Log, at ingress start, whether requests need a key (loudly when they do not)."""
    if config.enabled:
        log.info("API-key authentication is ON (%d keys: %s)", len(config.keys),
                 ", ".join(k.name for k in config.keys))
    else:
        log.warning("API-key authentication is OFF (KEEL_AUTH=off): anyone who reaches "
                     "this ingress can call every model. Set KEEL_AUTH=on outside a "
                     "local demo.")


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None


def authenticate(config: AuthConfig, headers: Mapping[str, str]) -> ApiKey:
    """The stored key matching the presented one; 401 without a key or for an unknown one.

    Every stored hash is compared (constant time each, no early exit), so the time taken
    says nothing about which key, or how much of one, matched.
    """
    key = presented_key(headers)
    if key is None:
        raise Unauthorized("an API key is required (Authorization: Bearer <key> "
                           "or X-API-Key: <key>)")
    digest = hash_key(key).encode("ascii")
    found: ApiKey | None = None
    for stored in config.keys:
        if hmac.compare_digest(digest, stored.sha256.lower().encode("ascii")):
            found = stored
    if found is None:
        raise Unauthorized("the API key is not valid")
    return found


def authorize(key: ApiKey | None, model: str) -> None:
    """403 when ``key`` may not use ``model`` (nothing to check when auth is off)."""
    if key is not None and not key.allows(model):
        raise Forbidden(f"API key {key.name!r} has no access to model {model!r}")


def key_of(scope: Mapping[str, Any]) -> ApiKey | None:
    """The request's authenticated key (``None`` when auth is off)."""
    key = scope.get(API_KEY_SCOPE_KEY)
    return key if isinstance(key, ApiKey) else None
