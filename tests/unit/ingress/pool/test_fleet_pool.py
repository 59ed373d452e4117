"""The data plane over a fleet (in process, real ONNX Runtime): members found on their
first request, 404s that name the fleet, readiness per fleet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deployments.errors import ModelNotFound
from deployments.ingress.dataplane.plane import DataPlane
from deployments.ingress.pool.placement import EmbeddedModels, ModelPool
from deployments.repository import ModelRepository
from tests.support.inprocess import InProcessFleet, MutableIngressConfig
from tests.support.modelkit import reference_probabilities, write_linear_model


def _body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "features", "shape": list(x.shape),
                                   "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
                      ).encode()


X = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)


@pytest.fixture
def fleet(tmp_path: Path) -> InProcessFleet:
    for i in range(3):
        write_linear_model(tmp_path / "tenants", f"t{i}", seed=20 + i)
    return InProcessFleet("Tenants", tmp_path / "tenants")


@pytest.fixture
def plane(tmp_path: Path, fleet: InProcessFleet) -> DataPlane:
    write_linear_model(tmp_path / "models", "solo", seed=1)
    embedded = EmbeddedModels(ModelRepository(tmp_path / "models"), ["solo"])
    embedded.apply({})
    return DataPlane(ModelPool(embedded, None, fleets=[fleet]), MutableIngressConfig())


async def test_members_answer_beside_other_models(plane: DataPlane) -> None:
    for i in range(3):
        answer = await plane.inference.infer(f"t{i}", None, _body(X), None)
        outputs = {o["name"]: o for o in json.loads(answer.body)["outputs"]}
        np.testing.assert_allclose(
            np.asarray(outputs["probabilities"]["data"]).reshape(3, 2),
            reference_probabilities(X, 20 + i), rtol=1e-5)
    assert (await plane.inference.infer("solo", None, _body(X), None)).version == "1"
    assert plane.models.placement("t1") == "fleet" and plane.models.fleet("t1") == "Tenants"
    assert plane.models.placement("solo") == "ingress" and plane.models.fleet("solo") is None
    metadata = await plane.model_metadata("t2", None)
    assert metadata["parameters"]["fleet"] == "Tenants"


async def test_a_member_dropped_in_later_joins_on_its_first_request(
        plane: DataPlane, fleet: InProcessFleet) -> None:
    assert "t9" not in plane.models.model_names()
    write_linear_model(fleet.directory, "t9", seed=29)
    answer = await plane.inference.infer("t9", None, _body(X), None)
    assert answer.version == "1"
    assert "t9" in plane.models.model_names()


async def test_an_unknown_model_is_a_404_naming_it_and_the_fleets(
        plane: DataPlane, fleet: InProcessFleet) -> None:
    with pytest.raises(ModelNotFound) as raised:
        await plane.inference.infer("t77", None, _body(X), None)
    message = raised.value.message
    assert "'t77' is not served here" in message
    assert "'solo'" in message and "fleet 'Tenants' (3 models)" in message
    # A directory without a complete version joins, then its status is the fleet's 404.
    (fleet.directory / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="'empty' is not in fleet 'Tenants'"):
        await plane.inference.infer("empty", None, _body(X), None)
    shutil.rmtree(fleet.directory / "t0")
    with pytest.raises(ModelNotFound, match="'t0' is not in fleet 'Tenants'"):
        await plane.inference.infer("t0", None, _body(X), None)


async def test_ready_probes_each_fleet_once_not_each_member(
        plane: DataPlane, fleet: InProcessFleet) -> None:
    ready, body = await plane.ready()
    assert ready, body
    assert list(body["models"]) == ["solo"]
    assert body["fleets"] == {"Tenants": {"ready": True, "models": 3}}
    assert fleet.warmed == 1 and fleet.members == {}  # nothing loaded by a probe
