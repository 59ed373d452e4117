"""The prompt cache's keys and values.

Keys are per tenant and cover the upstream, its model name, the normalised messages and
every other body field except the ones that cannot change the output (``user``,
``metadata``, ``store``...). Values are JSON, never pickles.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from deployments.llm.chat import ChatRequest
from deployments.storage.hashing import HashName, hasher

#: What a prompt cache entry holds: a whole answer, or a stream's chunks.
EntryKind = Literal["completion", "stream"]

#: Body fields that never change what the model answers: left out of the cache key.
#: ``stream``/``stream_options`` are keyed separately (a stream is cached as chunks).
_NOT_KEYED = frozenset({"model", "messages", "stream", "stream_options", "user", "metadata",
                        "store", "service_tier", "parallel_tool_calls_hint"})


def prompt_key(tenant: str, upstream: str, upstream_model: str, request: ChatRequest, *,
               hash_name: HashName = "blake3", prefix: str = "keel:llm:") -> str:
    """The cache key: tenant namespace + a hash over everything that decides the answer.

    Canonical JSON (sorted keys, no whitespace) of the upstream, its model name, the
    messages (with their extra fields, ``None``s dropped) and every other body field
    except those in ``_NOT_KEYED``; streams also key their ``stream_options``.
    """
    params = {k: v for k, v in (request.model_extra or {}).items()
              if k not in _NOT_KEYED and v is not None}
    for name in ("temperature", "seed", "n"):
        value = getattr(request, name)
        if value is not None:
            params[name] = value
    document = {
        "upstream": upstream, "model": upstream_model,
        "messages": [m.model_dump(exclude_none=True) for m in request.messages],
        "params": params, "stream": request.stream,
        "stream_options": request.stream_options if request.stream else None,
    }
    digest = hasher(hash_name)
    digest.update(tenant.encode() + b"\0")
    digest.update(json.dumps(document, sort_keys=True, separators=(",", ":"),
                             ensure_ascii=False).encode())
    return f"{prefix}c:{tenant}:{digest.hexdigest()}"


_ENTRY_MAGIC = b"KLC1"


def encode_entry(kind: EntryKind, payload: Any,
                 usage: dict[str, Any] | None) -> bytes:
    """A cache value: magic + JSON (never a pickle)."""
    return _ENTRY_MAGIC + json.dumps({"kind": kind, "payload": payload, "usage": usage},
                                     separators=(",", ":")).encode()


def decode_entry(data: bytes, kind: EntryKind) -> tuple[Any, dict[str, Any]]:
    """The payload and usage of a value ``encode_entry`` wrote; ``ValueError`` otherwise."""
    if not data.startswith(_ENTRY_MAGIC):
        raise ValueError("not a Keel prompt cache entry")
    try:
        entry = json.loads(data[len(_ENTRY_MAGIC):])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"damaged prompt cache entry: {exc}") from exc
    if not isinstance(entry, dict) or entry.get("kind") != kind:
        raise ValueError("prompt cache entry of the wrong kind")
    payload, usage = entry.get("payload"), entry.get("usage") or {}
    if kind == "completion" and not isinstance(payload, dict):
        raise ValueError("damaged prompt cache entry")
    if kind == "stream" and not (isinstance(payload, list)
                                 and all(isinstance(c, dict) for c in payload)):
        raise ValueError("damaged prompt cache entry")
    if not isinstance(usage, dict):
        raise ValueError("damaged prompt cache entry usage")
    return payload, usage

