"""OnnxRunner, ModelVersions and the ONNX model config, on real ONNX Runtime sessions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.errors import ConfigError, InvalidInput, ModelNotFound, ModelNotReady
from deployments.onnx.core import (
    ModelVersions,
    OnnxModelConfig,
    OnnxRunner,
    RuntimeOptions,
    available_providers,
    load_runner,
)
from deployments.repository import ModelRepository, ModelSpec, TensorSpec, dump_spec
from tests.support.modelkit import reference_probabilities, write_linear_model

ATOL = 1e-5


def _rows(n: int, seed: int = 42, n_features: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, n_features)).astype(np.float32)


def _probabilities(answer: object) -> np.ndarray:
    assert isinstance(answer, dict), answer
    value = answer["probabilities"]
    assert isinstance(value, np.ndarray)
    return value


@pytest.fixture
def runner(repository: ModelRepository) -> OnnxRunner:
    return load_runner(repository, "linear", "1", RuntimeOptions())


# --- OnnxRunner -----------------------------------------------------------------------


def test_runner_answers_like_the_reference(runner: OnnxRunner) -> None:
    x = _rows(5)
    out = runner.predict({"features": x})
    assert set(out) == {"probabilities", "label"}
    assert out["probabilities"].shape == (5, 2)
    assert out["probabilities"].dtype == np.float32
    expected = reference_probabilities(x, seed=0)
    np.testing.assert_allclose(out["probabilities"], expected, atol=ATOL)
    assert out["label"].dtype == np.int64
    np.testing.assert_array_equal(out["label"], expected.argmax(axis=1))
    assert runner.name == "linear"
    assert runner.version == "1"
    assert runner.providers[-1] == "CPUExecutionProvider"


def test_latest_version_has_its_own_weights(repository: ModelRepository) -> None:
    runner = load_runner(repository, "linear", None, RuntimeOptions())
    assert runner.version == "2"
    x = _rows(3)
    np.testing.assert_allclose(runner.predict({"features": x})["probabilities"],
                               reference_probabilities(x, seed=1), atol=ATOL)
    assert not np.allclose(reference_probabilities(x, seed=0),
                           reference_probabilities(x, seed=1), atol=1e-3)


def _rewrite_spec(root: Path, **changes: Any) -> ModelRepository:
    """Replace fields of linear/1's model.yaml (validated), keeping its ONNX file."""
    repository = ModelRepository(root)
    spec = repository.spec("linear", "1")
    data = spec.model_dump()
    data.update(changes)
    (root / "linear" / "1" / "model.yaml").write_text(dump_spec(ModelSpec.model_validate(data)))
    return repository


def _features(**changes: Any) -> TensorSpec:
    data: dict[str, Any] = {"name": "features", "datatype": "FP32", "shape": [-1, 4]}
    data.update(changes)
    return TensorSpec.model_validate(data)


def _outputs(*extra: TensorSpec) -> list[TensorSpec]:
    return [TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2]),
            TensorSpec(name="label", datatype="INT64", shape=[-1]), *extra]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"inputs": [_features(name="x")]}, ["'x'", "features"]),
        ({"inputs": [_features(datatype="FP64")]}, ["input 'features'", "FP64", "tensor(float)"]),
        ({"inputs": [_features(shape=[-1, 4, 1])]}, ["input 'features'", "rank 3"]),
        ({"inputs": [_features(shape=[-1, 5])]}, ["input 'features'", "[-1, 5]"]),
        ({"outputs": _outputs(TensorSpec(name="score", datatype="FP32", shape=[-1]))},
         ["output 'score'", "not in the ONNX model"]),
        ({"outputs": [TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 3]),
                      TensorSpec(name="label", datatype="INT64", shape=[-1])]},
         ["output 'probabilities'", "[-1, 3]"]),
        ({"outputs": [TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2]),
                      TensorSpec(name="label", datatype="INT32", shape=[-1])]},
         ["output 'label'", "INT32", "tensor(int64)"]),
    ],
    ids=["input-name", "datatype", "rank", "fixed-dim", "missing-output", "output-dim",
         "output-datatype"],
)
def test_spec_that_disagrees_with_the_onnx_file_fails_at_load(
    model_root: Path, changes: dict[str, Any], expected: list[str]
) -> None:
    repository = _rewrite_spec(model_root, **changes)
    with pytest.raises(ConfigError) as info:
        load_runner(repository, "linear", "1", RuntimeOptions())
    message = info.value.message
    assert "model 'linear' version '1'" in message
    for part in expected:
        assert part in message, message


def test_spec_may_pin_a_symbolic_dimension(model_root: Path) -> None:
    # The ONNX batch dimension is symbolic: declaring it fixed is a narrowing, not a conflict.
    repository = _rewrite_spec(
        model_root, inputs=[_features(shape=[2, 4])],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[2, 2]),
                 TensorSpec(name="label", datatype="INT64", shape=[2])])
    runner = load_runner(repository, "linear", "1", RuntimeOptions())
    x = _rows(2)
    np.testing.assert_allclose(runner.predict({"features": x})["probabilities"],
                               reference_probabilities(x, seed=0), atol=ATOL)


def test_spec_may_declare_a_subset_of_outputs(model_root: Path) -> None:
    repository = _rewrite_spec(model_root, outputs=_outputs()[:1])
    runner = load_runner(repository, "linear", "1", RuntimeOptions())
    x = _rows(2)
    out = runner.predict({"features": x})
    assert set(out) == {"probabilities"}


def test_unreadable_onnx_file_is_a_config_error(model_root: Path) -> None:
    (model_root / "linear" / "1" / "model.onnx").write_bytes(b"this is not protobuf")
    with pytest.raises(ConfigError, match="cannot load"):
        load_runner(ModelRepository(model_root), "linear", "1", RuntimeOptions())


def test_predict_batch_equals_each_request_alone(runner: OnnxRunner) -> None:
    requests = [{"features": _rows(n, seed=n)} for n in (1, 3, 2, 7, 1)]
    answers = runner.predict_batch(requests)
    assert len(answers) == len(requests)
    for request, answer in zip(requests, answers, strict=True):
        alone = runner.predict(request)
        assert isinstance(answer, dict)
        assert set(answer) == {"probabilities", "label"}
        assert answer["probabilities"].shape == (request["features"].shape[0], 2)
        np.testing.assert_allclose(answer["probabilities"], alone["probabilities"], atol=ATOL)
        np.testing.assert_array_equal(answer["label"], alone["label"])
        np.testing.assert_allclose(answer["probabilities"],
                                   reference_probabilities(request["features"], seed=0),
                                   atol=ATOL)


def test_predict_batch_of_nothing_is_nothing(runner: OnnxRunner) -> None:
    assert runner.predict_batch([]) == []


def test_one_bad_request_does_not_fail_its_neighbours(runner: OnnxRunner) -> None:
    good_a, good_b = _rows(2, seed=1), _rows(3, seed=2)
    requests: list[dict[str, np.ndarray]] = [
        {"features": good_a},
        {"features": _rows(2).astype(np.float64)},          # wrong dtype
        {"features": good_b},
        {"features": _rows(2, n_features=3)},               # wrong column count
        {"features": _rows(2)[0]},                          # wrong rank
        {"feature": _rows(1)},                              # wrong name
    ]
    answers = runner.predict_batch(requests)
    np.testing.assert_allclose(_probabilities(answers[0]),
                               reference_probabilities(good_a, seed=0), atol=ATOL)
    np.testing.assert_allclose(_probabilities(answers[2]),
                               reference_probabilities(good_b, seed=0), atol=ATOL)
    for i in (1, 3, 4, 5):
        assert isinstance(answers[i], InvalidInput), answers[i]
    assert "'features'" in str(answers[1]) and "float64" in str(answers[1])
    assert "'features'" in str(answers[3]) and "[2, 3]" in str(answers[3])
    assert "'features'" in str(answers[4])
    assert "feature" in str(answers[5]) and "'features'" in str(answers[5])


def test_fixed_batch_model_runs_each_request_alone(repository: ModelRepository) -> None:
    runner = load_runner(repository, "fixed", None, RuntimeOptions())
    rows = [_rows(1, seed=s) for s in range(4)]
    answers = runner.predict_batch([{"features": x} for x in [*rows, _rows(2)]])
    for x, answer in zip(rows, answers, strict=False):
        np.testing.assert_allclose(_probabilities(answer), reference_probabilities(x, seed=3),
                                   atol=ATOL)
    assert isinstance(answers[4], InvalidInput)
    assert "'features'" in str(answers[4]) and "[2, 4]" in str(answers[4])


def test_predict_a_subset_of_outputs(runner: OnnxRunner) -> None:
    x = _rows(4)
    out = runner.predict({"features": x}, outputs=["label"])
    assert list(out) == ["label"]
    np.testing.assert_array_equal(out["label"], reference_probabilities(x, 0).argmax(axis=1))


def test_predict_unknown_output_is_invalid_input(runner: OnnxRunner) -> None:
    with pytest.raises(InvalidInput) as info:
        runner.predict({"features": _rows(1)}, outputs=["logits"])
    assert "'logits'" in info.value.message
    assert "probabilities" in info.value.message


def test_predict_checks_inputs(runner: OnnxRunner) -> None:
    with pytest.raises(InvalidInput, match="'features'"):
        runner.predict({"features": _rows(1).astype(np.float16)})
    with pytest.raises(InvalidInput, match="takes inputs"):
        runner.predict({"features": _rows(1), "extra": _rows(1)})


# --- OnnxModelConfig ------------------------------------------------------------------


def test_config_defaults() -> None:
    config = OnnxModelConfig()
    assert config.version is None
    assert config.max_batch_size == 32
    assert config.runtime == RuntimeOptions()


@pytest.mark.parametrize("value", [0, -1, 4097])
def test_max_batch_size_bounds(value: int) -> None:
    with pytest.raises(ValidationError, match="max_batch_size"):
        OnnxModelConfig(max_batch_size=value)


@pytest.mark.parametrize("value", [1, 4096])
def test_max_batch_size_limits_are_accepted(value: int) -> None:
    assert OnnxModelConfig(max_batch_size=value).max_batch_size == value


def test_config_refuses_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="max_batch"):
        OnnxModelConfig.model_validate({"max_batch": 8})
    with pytest.raises(ValidationError, match="threads"):
        OnnxModelConfig.model_validate({"runtime": {"threads": 2}})


def test_config_refuses_an_empty_version() -> None:
    with pytest.raises(ValidationError, match="version"):
        OnnxModelConfig(version="  ")


def test_check_max_ongoing_requests_refuses_a_smaller_limit() -> None:
    config = OnnxModelConfig(max_batch_size=32)
    with pytest.raises(ConfigError) as info:
        config.check_max_ongoing_requests(5)
    message = info.value.message
    assert "max_ongoing_requests" in message
    assert "max_batch_size" in message
    assert "5" in message and "32" in message


@pytest.mark.parametrize("limit", [None, 32, 33, 1000])
def test_check_max_ongoing_requests_passes(limit: int | None) -> None:
    OnnxModelConfig(max_batch_size=32).check_max_ongoing_requests(limit)


# --- providers ------------------------------------------------------------------------


def test_available_providers_default_ends_with_cpu() -> None:
    providers = available_providers(None)
    assert providers[-1] == "CPUExecutionProvider"
    assert providers.count("CPUExecutionProvider") == 1
    assert set(providers) <= {"CUDAExecutionProvider", "CPUExecutionProvider"}


def test_available_providers_cpu_only() -> None:
    assert available_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_unknown_provider_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        available_providers(["NoSuchProvider"])
    assert "NoSuchProvider" in info.value.message


def test_runner_with_an_unknown_provider_fails_to_load(repository: ModelRepository) -> None:
    with pytest.raises(ConfigError, match="NoSuchProvider"):
        load_runner(repository, "linear", "1", RuntimeOptions(providers=["NoSuchProvider"]))


# --- ModelVersions --------------------------------------------------------------------


def _check_answers(runner: OnnxRunner, seed: int) -> None:
    x = _rows(3, seed=seed + 100)
    np.testing.assert_allclose(runner.predict({"features": x})["probabilities"],
                               reference_probabilities(x, seed=seed), atol=ATOL)


def test_versions_not_loaded_yet(repository: ModelRepository) -> None:
    versions = ModelVersions(repository, "linear")
    with pytest.raises(ModelNotReady, match="'linear'"):
        versions.runner_for(None)
    assert versions.loaded() == {}


def test_versions_apply_latest(repository: ModelRepository) -> None:
    versions = ModelVersions(repository, "linear")
    assert versions.apply(OnnxModelConfig()) is True
    current = versions.runner_for(None)
    assert current.version == "2"
    assert versions.runner_for("2") is current
    assert versions.previous is None
    assert list(versions.loaded()) == ["2"]
    _check_answers(current, seed=1)


def test_versions_apply_same_config_is_a_no_op(repository: ModelRepository) -> None:
    versions = ModelVersions(repository, "linear")
    versions.apply(OnnxModelConfig())
    current = versions.current
    assert versions.apply(OnnxModelConfig()) is False
    assert versions.apply(OnnxModelConfig(version="2")) is False
    # Batch knobs do not touch the runner.
    assert versions.apply(OnnxModelConfig(version="2", max_batch_size=8)) is False
    assert versions.current is current


def test_versions_pin_swap_and_swap_back(repository: ModelRepository) -> None:
    versions = ModelVersions(repository, "linear")
    assert versions.apply(OnnxModelConfig(version="1")) is True
    one = versions.runner_for(None)
    assert one.version == "1"
    _check_answers(one, seed=0)
    with pytest.raises(ModelNotFound, match="not loaded"):
        versions.runner_for("2")

    assert versions.apply(OnnxModelConfig(version="2")) is True
    two = versions.runner_for(None)
    assert two.version == "2"
    _check_answers(two, seed=1)
    # The replaced version stays loaded for requests pinned to it.
    assert versions.runner_for("1") is one
    assert versions.previous is one
    assert sorted(versions.loaded()) == ["1", "2"]
    _check_answers(versions.runner_for("1"), seed=0)

    # Swapping back reuses the loaded runner instead of reloading it.
    assert versions.apply(OnnxModelConfig(version="1")) is True
    assert versions.current is one
    assert versions.runner_for("2") is two
    assert versions.apply(OnnxModelConfig(version="2")) is True
    assert versions.current is two
    assert versions.previous is one


def test_versions_runner_for_unknown_version(repository: ModelRepository) -> None:
    versions = ModelVersions(repository, "linear")
    versions.apply(OnnxModelConfig())
    with pytest.raises(ModelNotFound) as info:
        versions.runner_for("9")
    assert "'9'" in info.value.message
    assert "not loaded" not in info.value.message


def test_versions_apply_unknown_version(repository: ModelRepository) -> None:
    versions = ModelVersions(repository, "linear")
    versions.apply(OnnxModelConfig())
    current = versions.current
    with pytest.raises(ModelNotFound, match="'9'"):
        versions.apply(OnnxModelConfig(version="9"))
    assert versions.current is current


def test_versions_runtime_option_change_reloads(repository: ModelRepository) -> None:
    versions = ModelVersions(repository, "linear")
    versions.apply(OnnxModelConfig())
    before = versions.runner_for(None)
    runtime = RuntimeOptions(intra_op_num_threads=2, graph_optimization_level="basic")
    assert versions.apply(OnnxModelConfig(runtime=runtime)) is True
    after = versions.runner_for(None)
    assert after is not before
    assert after.version == "2"
    assert after.options == runtime
    _check_answers(after, seed=1)
    assert versions.apply(OnnxModelConfig(runtime=runtime)) is False


def test_versions_runtime_reload_keeps_the_pinned_previous_version(
        repository: ModelRepository) -> None:
    versions = ModelVersions(repository, "linear")
    versions.apply(OnnxModelConfig(version="1"))
    versions.apply(OnnxModelConfig(version="2"))
    assert versions.runner_for("1").version == "1"
    versions.apply(OnnxModelConfig(version="2", runtime=RuntimeOptions(intra_op_num_threads=2)))
    assert versions.runner_for("1").version == "1"
    assert sorted(versions.loaded()) == ["1", "2"]


def test_versions_new_latest_version_is_picked_up(model_root: Path) -> None:
    repository = ModelRepository(model_root)
    versions = ModelVersions(repository, "linear")
    versions.apply(OnnxModelConfig())
    write_linear_model(model_root, "linear", "10", seed=5)
    assert versions.apply(OnnxModelConfig()) is True
    current = versions.runner_for(None)
    assert current.version == "10"
    _check_answers(current, seed=5)
    assert versions.runner_for("2").version == "2"


def test_batch_variant_model_answers_each_row_as_if_alone(tmp_path: Path) -> None:
    """A dynamically quantised model (batch_invariant: false) runs row by row."""
    from graph.demo.build import build_demo_repository
    from graph.demo.dataset import DatasetConfig

    build_demo_repository(tmp_path, config=DatasetConfig(n_train_rows=2000))
    repository = ModelRepository(tmp_path)
    spec = repository.spec("risk_mlp_int8")
    assert spec.batch_invariant is False
    runner = load_runner(repository, "risk_mlp_int8", None, RuntimeOptions())
    x = np.random.default_rng(3).normal(scale=3.0, size=(64, 12)).astype(np.float32)
    alone = [runner.predict({"features": x[i:i + 1]})["probabilities"] for i in range(64)]
    batched = runner.predict_batch([{"features": x[:40]}, {"features": x[40:]}])
    stacked = np.concatenate([r["probabilities"] for r in batched  # type: ignore[index]
                              if not isinstance(r, Exception)])
    np.testing.assert_array_equal(stacked, np.concatenate(alone))
    # The raw session does depend on the batch: the rule is what makes the answers equal.
    raw = runner.session.run(["probabilities"], {"features": x})[0]
    assert not np.array_equal(raw, np.concatenate(alone))


def test_infer_batch_mixes_versions_errors_and_output_subsets(
        repository: ModelRepository) -> None:
    from deployments.contracts import InferCall, InferResult

    versions = ModelVersions(repository, "linear")
    versions.apply(OnnxModelConfig(version="1"))
    versions.apply(OnnxModelConfig(version="2"))  # serves 2, keeps 1 loaded
    x = _rows(5)
    calls = [
        InferCall(inputs={"features": x[:2]}),                       # served version (2)
        InferCall(inputs={"features": x[2:3]}, version="1"),         # pinned to 1
        InferCall(inputs={"features": x[3:5]}, outputs=["label"]),   # subset of outputs
        InferCall(inputs={"features": x[:1].astype(np.float64)}),    # bad dtype
        InferCall(inputs={"features": x[:1]}, version="9"),          # no such version
    ]
    results = versions.infer_batch(calls)
    first, pinned, subset, bad, missing = results
    assert isinstance(first, InferResult) and first.model_version == "2"
    assert first.batch_size == 3  # calls 0, 2 and 3 shared version 2's group
    np.testing.assert_allclose(first.outputs["probabilities"],
                               reference_probabilities(x[:2], seed=1), atol=1e-5)
    assert isinstance(pinned, InferResult) and pinned.model_version == "1"
    np.testing.assert_allclose(pinned.outputs["probabilities"],
                               reference_probabilities(x[2:3], seed=0), atol=1e-5)
    assert isinstance(subset, InferResult) and list(subset.outputs) == ["label"]
    assert subset.outputs["label"].shape == (2,)
    assert isinstance(bad, InvalidInput) and "expected FP32" in bad.message
    assert isinstance(missing, ModelNotFound) and "'9'" in missing.message


# --- traffic splits -------------------------------------------------------------------


@pytest.mark.parametrize(("traffic", "version", "message"), [
    ({}, None, "names no version"),
    ({"1": -1, "2": 5}, None, r"version '1': weight -1 "),
    ({"1": float("inf")}, None, r"version '1': weight inf"),
    ({"1": 0, "2": 0}, None, "every weight is 0"),
    ({"../1": 1}, None, "is not a version name"),
    ({"1": 1, "2": 1}, "3", "not the served version '3'"),
])
def test_a_traffic_split_that_cannot_route_is_refused_naming_the_field(
        traffic: dict[str, float], version: str | None, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        OnnxModelConfig(traffic=traffic, version=version)
    assert "traffic" in str(info.value)


def test_the_primary_version_is_the_pinned_one_else_the_heaviest() -> None:
    assert OnnxModelConfig(traffic={"1": 90, "2": 10}).primary_version == "1"
    assert OnnxModelConfig(traffic={"1": 5, "2": 5}).primary_version == "2"  # tie: newest
    assert OnnxModelConfig(traffic={"1": 90, "2": 10}, version="2").primary_version == "2"
    assert OnnxModelConfig().primary_version is None


def test_versions_with_traffic_keep_every_named_version_loaded(
        repository: ModelRepository) -> None:
    versions = ModelVersions(repository, "linear")
    assert versions.apply(OnnxModelConfig(traffic={"1": 95, "2": 5})) is True
    assert versions.current is not None and versions.current.version == "1"
    assert sorted(versions.loaded()) == ["1", "2"]
    status = versions.status()
    assert status.served_version == "1" and status.traffic == {"1": 95, "2": 5}
    assert sorted(status.loaded) == ["1", "2"]
    _check_answers(versions.runner_for("1"), seed=0)
    _check_answers(versions.runner_for("2"), seed=1)
    one, two = versions.runner_for("1"), versions.runner_for("2")
    # New weights reuse the loaded sessions; promoting 2 keeps 1 as the split's other.
    assert versions.apply(OnnxModelConfig(traffic={"1": 50, "2": 50}, version="1")) is False
    assert versions.apply(OnnxModelConfig(traffic={"1": 10, "2": 90})) is True
    assert versions.current is two and versions.runner_for("1") is one
    assert versions.status().traffic == {"1": 10, "2": 90}
    # Retiring 1 ends the split; 2 was already the served version, so 1 is unloaded (it is
    # not "the version 2 replaced", which stays loaded only across a swap of the served one).
    assert versions.apply(OnnxModelConfig(version="2")) is True
    assert versions.current is two and sorted(versions.loaded()) == ["2"]
    assert versions.status().traffic == {}
    with pytest.raises(ModelNotFound, match="in the repository but not loaded"):
        versions.runner_for("1")


def test_a_split_naming_a_missing_version_changes_nothing(repository: ModelRepository) -> None:
    versions = ModelVersions(repository, "linear")
    versions.apply(OnnxModelConfig(version="1"))
    before = versions.current
    with pytest.raises(ConfigError, match=r"traffic: version '7' of model 'linear'"):
        versions.apply(OnnxModelConfig(traffic={"1": 90, "7": 10}))
    assert versions.current is before and sorted(versions.loaded()) == ["1"]
    assert versions.status().traffic == {}
