"""Which version of a model answers a request (no Ray here).

A model's live config may split its traffic between loaded versions
(``OnnxModelConfig.traffic``, e.g. ``{"1": 95, "2": 5}``). The ingress picks the
version of every request that pins none *before* keying the prediction cache, so a
cached row always stays under the version that computed it. With a route key (the
``X-Keel-Route-Key`` header, or for ``/v1/decide`` each entity) the choice is a hash
of the model and the key, so one key keeps its version for as long as the weights do
not change (and mostly keeps it when they do: the versions' shares are contiguous
ranges of the hash, in version order). Without one it is random per request.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from typing import Any

from deployments.repository import version_key

#: The HTTP header (and gRPC metadata key, lower case) that makes the split sticky.
ROUTE_KEY_HEADER = "X-Keel-Route-Key"
#: Longest route key kept (a longer one is cut: it only feeds a hash).
MAX_ROUTE_KEY = 512


def key_point(model: str, key: str) -> float:
    """Where ``key`` falls in [0, 1) for ``model``: a stable hash, the same on every
    replica and across restarts."""
    digest = hashlib.blake2b(f"{model}\x00{key[:MAX_ROUTE_KEY]}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose_version(model: str, traffic: Mapping[str, float], key: str | None, *,
                   draw: Callable[[], float] = random.random) -> str:
    """The version a request goes to: by ``key``'s point in the split, or by ``draw``."""
    versions = sorted((v for v, w in traffic.items() if w > 0), key=version_key)
    if not versions:
        raise ValueError("traffic: every weight is 0")
    total = sum(traffic[v] for v in versions)
    point = (key_point(model, key) if key is not None else draw()) * total
    for version in versions:
        point -= traffic[version]
        if point < 0:
            return version
    return versions[-1]


def entity_key(entity: Mapping[str, Any]) -> str:
    """A decision entity's route key: its key fields in name order (``a=1&b=2``)."""
    return "&".join(f"{name}={entity[name]}" for name in sorted(entity))
