"""Settings classes read from a given environment instead of the process's."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar
from unittest import mock

from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def settings_from(cls: type[S], env: Mapping[str, str]) -> S:
    """``cls`` as a replica whose environment is exactly ``env`` would read it."""
    with mock.patch.dict(os.environ, env, clear=True):
        return cls()
