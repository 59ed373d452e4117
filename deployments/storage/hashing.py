"""The hash functions keys are made with (blake3, or sha256 where FIPS asks for it)."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import blake3

HashName = Literal["blake3", "sha256"]


def hasher(name: HashName) -> Any:
    """A fresh BLAKE3 or SHA-256 hasher (``update``/``hexdigest``); the prompt cache uses it too."""
    if name == "blake3":
        return blake3.blake3()
    if name == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash {name!r}")
