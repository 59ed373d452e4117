"""The fleet's plain logic (no Ray): members, the replica ledger, status from the
repository, the spec cache."""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.contracts import InferCall, InferResult
from deployments.errors import ConfigError, ModelNotFound
from deployments.fleet.core import (
    LATEST_CHECK_S,
    CachingRepository,
    FleetArgs,
    FleetConfig,
    FleetLedger,
    FleetMember,
    fleet_members,
    fleet_status,
    holds,
)
from deployments.onnx.core import RuntimeOptions
from deployments.repository import ModelRepository
from tests.support.modelkit import reference_probabilities, write_linear_model

X = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    for i in range(3):
        write_linear_model(tmp_path, f"t{i}", "1", seed=10 + i)
    return tmp_path


def answer(member: FleetMember, version: str | None = None) -> InferResult:
    [result] = member.infer_batch([InferCall(inputs={"features": X}, version=version)])
    assert isinstance(result, InferResult), result
    return result


def test_a_member_answers_with_its_own_latest_version(fleet: Path) -> None:
    member = FleetMember(ModelRepository(fleet), "t1", RuntimeOptions())
    result = answer(member)
    assert (result.model_name, result.model_version) == ("t1", "1")
    np.testing.assert_allclose(result.outputs["probabilities"],
                               reference_probabilities(X, 11), rtol=1e-5)


def test_a_newer_version_is_loaded_on_the_next_look_and_the_old_one_kept_for_pins(
        fleet: Path) -> None:
    member = FleetMember(ModelRepository(fleet), "t1", RuntimeOptions())
    calls = [InferCall(inputs={"features": X})]
    assert not member.needs_refresh(calls, RuntimeOptions())
    write_linear_model(fleet, "t1", "2", seed=99)
    # Not looked for before LATEST_CHECK_S... unless a call is keyed with the newer one.
    assert not member.needs_refresh(calls, RuntimeOptions())
    assert member.needs_refresh([InferCall(inputs={"features": X}, version="2")],
                                RuntimeOptions())
    assert member.needs_refresh(calls, RuntimeOptions(), now=time.monotonic() + LATEST_CHECK_S)
    assert member.refresh(RuntimeOptions()) is True
    assert member.version == "2"
    np.testing.assert_allclose(answer(member).outputs["probabilities"],
                               reference_probabilities(X, 99), rtol=1e-5)
    pinned = answer(member, "1")  # the version it replaced still answers pinned requests
    assert pinned.model_version == "1"
    np.testing.assert_allclose(pinned.outputs["probabilities"],
                               reference_probabilities(X, 11), rtol=1e-5)
    assert member.refresh(RuntimeOptions()) is False  # nothing newer: nothing reloaded
    write_linear_model(fleet, "t1", "3", seed=7)
    member.refresh(RuntimeOptions())
    [old] = member.infer_batch([InferCall(inputs={"features": X}, version="1")])
    assert isinstance(old, ModelNotFound) and old.serving == "3", old


def test_a_runtime_change_reloads_on_the_next_call(fleet: Path) -> None:
    member = FleetMember(ModelRepository(fleet), "t0", RuntimeOptions())
    changed = RuntimeOptions(graph_optimization_level="basic")
    assert member.needs_refresh([], changed)
    assert member.refresh(changed) is True and member.runtime == changed


def test_a_member_missing_from_the_directory_is_a_404(fleet: Path) -> None:
    with pytest.raises(ModelNotFound, match="'t9'"):
        FleetMember(ModelRepository(fleet), "t9", RuntimeOptions())


def test_unloading_is_told_once(fleet: Path) -> None:
    told: list[str] = []
    member = FleetMember(ModelRepository(fleet), "t2", RuntimeOptions(), on_unload=told.append)
    member.__del__()  # what Ray Serve's LRU calls when it drops the model
    member.__del__()
    del member
    gc.collect()  # the garbage collector calls it once more
    assert told == ["t2"]


def test_the_ledger_keeps_loads_unloads_and_what_is_loaded() -> None:
    ledger = FleetLedger()
    ledger.loaded("a", 3.2)
    ledger.loaded("b", 1.0)
    ledger.unloaded("a")
    ledger.loaded("a", 2.0)
    ledger.load_failed("zz")
    ledger.answered("a", 4)
    ledger.answered("a", 1)
    snapshot = ledger.snapshot()
    assert snapshot["loaded"] == ["a", "b"]
    assert snapshot["loads"] == {"a": 2, "b": 1} and snapshot["unloads"] == {"a": 1}
    assert snapshot["failed_loads"] == {"zz": 1}
    assert snapshot["calls"] == {"a": 2} and snapshot["rows"] == {"a": 5}
    assert snapshot["load_ms"] == [3.2, 1.0, 2.0]


def test_status_comes_from_the_repository_with_the_two_latest_versions(fleet: Path) -> None:
    specs = CachingRepository(fleet)
    status = fleet_status(specs, "F", "t0")
    assert status.served_version == "1" and list(status.loaded) == ["1"]
    write_linear_model(fleet, "t0", "2", seed=5)
    write_linear_model(fleet, "t0", "10", seed=6)
    status = fleet_status(specs, "F", "t0")
    assert status.served_version == "10"
    assert sorted(status.loaded) == ["10", "2"]
    assert status.available_versions == ["1", "2", "10"]
    with pytest.raises(ModelNotFound, match="'nope' is not in fleet 'F'"):
        fleet_status(specs, "F", "nope")
    with pytest.raises(ModelNotFound, match="not a valid model name"):
        fleet_status(specs, "F", "../t0")


def test_specs_are_parsed_once_per_version_and_bounded(fleet: Path) -> None:
    specs = CachingRepository(fleet, max_entries=2)
    first = specs.spec("t0", "1")
    (fleet / "t0" / "1" / "model.yaml").write_text("not: [valid")  # never read again
    assert specs.spec("t0", "1") is first
    assert specs.spec("t0") is first  # the latest version, by default
    member = FleetMember(specs, "t0", RuntimeOptions())  # a load reads the kept spec too
    assert answer(member).model_version == "1"
    specs.spec("t1", "1")
    specs.spec("t2", "1")  # t0 is the least recently used: out
    with pytest.raises(ConfigError, match="not valid YAML"):
        specs.spec("t0", "1")


def test_membership_is_the_directory(fleet: Path) -> None:
    assert fleet_members(fleet) == ["t0", "t1", "t2"]
    assert fleet_members(fleet / "missing") == []
    assert holds(fleet, "t1") and not holds(fleet, "t7")
    assert not holds(fleet, "..") and not holds(fleet, ".hidden") and not holds(fleet, "a/b")
    shutil.copytree(fleet / "t0", fleet / "new")
    assert holds(fleet, "new") and "new" in fleet_members(fleet)


@pytest.mark.parametrize(("raw", "field"), [
    ({"directory": ""}, "directory"),
    ({"directory": "../elsewhere"}, "directory"),
    ({"directory": "t", "max_models_per_replica": 0}, "max_models_per_replica"),
    ({"directory": "t", "max_models": 3}, "max_models"),
])
def test_fleet_args_refuse_bad_values_naming_the_field(raw: dict[str, object],
                                                       field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        FleetArgs.model_validate(raw)


def test_fleet_config_refuses_bad_runtime_options() -> None:
    with pytest.raises(ValidationError, match=r"runtime\.intra_op_num_threads"):
        FleetConfig.model_validate({"runtime": {"intra_op_num_threads": -1}})
    with pytest.raises(ValidationError, match="version"):
        FleetConfig.model_validate({"version": "1"})  # members serve their latest
