"""Fixtures of the unit tests: a real model repository on disk and an in-process ingress."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from deployments.ingress.rest.app import create_app
from deployments.repository import ModelRepository
from tests.support.inprocess import InProcessModels, MutableIngressConfig
from tests.support.modelkit import write_linear_model


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    """``linear`` 1 (seed 0) and 2 (seed 1), ``nanok`` (NaN allowed), ``fixed`` (batch of 1)."""
    root = tmp_path / "models"
    write_linear_model(root, "linear", "1", seed=0)
    write_linear_model(root, "linear", "2", seed=1)
    write_linear_model(root, "nanok", "1", seed=2, allow_nan=True)
    write_linear_model(root, "fixed", "1", seed=3, fixed_batch=1)
    return root


@pytest.fixture
def repository(model_root: Path) -> ModelRepository:
    return ModelRepository(model_root)


@pytest.fixture
def backend(repository: ModelRepository) -> InProcessModels:
    return InProcessModels(repository)


@pytest.fixture
def ingress_config() -> MutableIngressConfig:
    return MutableIngressConfig()


@pytest.fixture
def client(backend: InProcessModels, ingress_config: MutableIngressConfig) -> Iterator[TestClient]:
    # Unexpected exceptions come back as the app's 500 answer, so a test sees the status.
    with TestClient(create_app(backend, ingress_config), raise_server_exceptions=False) as c:
        yield c


#: The machine's Redis (CI starts one when none answers).
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of the test's own in the machine's Redis; its keys deleted after."""
    value = f"keel:test:{uuid.uuid4().hex[:12]}:"
    yield value
    sync = redis.Redis.from_url(REDIS_URL)
    keys = list(sync.scan_iter(match=f"{value}*"))
    if keys:
        sync.delete(*keys)
    sync.close()
