"""model.yaml parsing and the model repository's directory rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.errors import ConfigError, ModelNotFound
from deployments.repository import (
    DecisionRule,
    ModelRepository,
    ModelSpec,
    TensorSpec,
    dump_spec,
    parse_spec,
    version_key,
)
from tests.support.modelkit import write_linear_model

SOURCE = "models/linear/1/model.yaml"


def _spec() -> ModelSpec:
    return ModelSpec(
        name="linear",
        version="1",
        description="a spec with every field set",
        inputs=[
            TensorSpec(name="features", datatype="FP32", shape=[-1, 3], allow_nan=True,
                       columns=["v:a", "v:b", "v:c"], description="three features"),
            TensorSpec(name="mask", datatype="BOOL", shape=[-1]),
        ],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2]),
                 TensorSpec(name="label", datatype="INT64", shape=[-1])],
        decision=DecisionRule(output="probabilities", index=1, threshold=0.7),
        metrics={"auc": 0.81, "logloss": 0.4},
        labels={"seed": "7", "trainer": "sklearn"},
    )


def _doc(**changes: object) -> dict[str, object]:
    """The YAML document of ``_spec()`` with top-level keys replaced."""
    doc: dict[str, object] = yaml.safe_load(dump_spec(_spec()))
    doc.update(changes)
    return doc


def _parse(doc: object) -> ModelSpec:
    return parse_spec(yaml.safe_dump(doc), name="linear", version="1", source=SOURCE)


# --- parse_spec / dump_spec ---------------------------------------------------------


def test_valid_spec_round_trips() -> None:
    spec = _spec()
    text = dump_spec(spec)
    assert parse_spec(text, name="linear", version="1") == spec
    # Name and version live in the path, not in the file.
    doc = yaml.safe_load(text)
    assert "name" not in doc and "version" not in doc
    assert list(doc) == ["platform", "description", "inputs", "outputs", "decision",
                         "batch_invariant", "metrics", "labels"]
    assert doc["decision"]["threshold"] == 0.7 and doc["inputs"][0]["shape"] == [-1, 3]
    assert "shape: [-1, 3]" in text


def test_parse_takes_name_and_version_from_the_directory() -> None:
    spec = parse_spec(dump_spec(_spec()), name="linear", version="12")
    assert spec.version == "12"
    assert spec.name == "linear"


def test_matching_name_and_version_in_yaml_are_accepted() -> None:
    spec = _parse(_doc(name="linear", version=1))
    assert (spec.name, spec.version) == ("linear", "1")


def test_defaults_of_a_minimal_spec() -> None:
    text = (
        "inputs:\n"
        "  - {name: x, datatype: FP32, shape: [-1, 2]}\n"
        "outputs:\n"
        "  - {name: y, datatype: FP32, shape: [-1]}\n"
    )
    spec = parse_spec(text, name="m", version="3")
    assert spec.platform == "onnxruntime_onnx"
    assert spec.decision is None
    assert spec.inputs[0].allow_nan is False
    assert spec.inputs[0].batched is True
    assert spec.metrics == {}


def _message(doc: object, *, text: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        if text is not None:
            parse_spec(text, name="linear", version="1", source=SOURCE)
        else:
            _parse(doc)
    message = info.value.message
    assert SOURCE in message, message
    return message


def test_bad_datatype_names_the_field() -> None:
    doc = _doc()
    doc["inputs"] = [{"name": "features", "datatype": "FP33", "shape": [-1, 3]}]
    message = _message(doc)
    assert "inputs.0.datatype" in message


def test_columns_count_must_match_last_dimension() -> None:
    doc = _doc()
    doc["inputs"] = [{"name": "features", "datatype": "FP32", "shape": [-1, 4],
                      "columns": ["v:a", "v:b", "v:c"]}]
    message = _message(doc)
    assert "inputs.0" in message
    assert "'features'" in message
    assert "3 columns" in message and "4" in message


def test_columns_with_a_free_last_dimension_are_accepted() -> None:
    doc = _doc()
    doc["inputs"] = [{"name": "features", "datatype": "FP32", "shape": [-1, -1],
                      "columns": ["v:a", "v:b", "v:c"]}]
    assert _parse(doc).inputs[0].columns == ["v:a", "v:b", "v:c"]


def test_duplicate_input_names_are_refused() -> None:
    doc = _doc()
    doc["inputs"] = [{"name": "x", "datatype": "FP32", "shape": [-1]},
                     {"name": "x", "datatype": "FP32", "shape": [-1]}]
    message = _message(doc)
    assert "duplicate input names" in message
    assert "'x'" in message


def test_duplicate_output_names_are_refused() -> None:
    doc = _doc(decision=None)
    doc["outputs"] = [{"name": "y", "datatype": "FP32", "shape": [-1]},
                      {"name": "y", "datatype": "FP32", "shape": [-1]}]
    assert "duplicate output names" in _message(doc)


def test_decision_output_must_be_an_output() -> None:
    message = _message(_doc(decision={"output": "score", "index": 0}))
    assert "decision.output" in message
    assert "'score'" in message


def test_decision_threshold_must_be_finite() -> None:
    message = _message(_doc(decision={"output": "probabilities", "threshold": float("nan")}))
    assert "decision.threshold" in message


def test_name_in_yaml_must_match_directory() -> None:
    message = _message(_doc(name="other"))
    assert "name 'other'" in message
    assert "'linear'" in message


def test_version_in_yaml_must_match_directory() -> None:
    message = _message(_doc(version=2))
    assert "version 2" in message
    assert "'1'" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_document_must_be_a_mapping(text: str) -> None:
    assert "expected a mapping" in _message(None, text=text)


def test_broken_yaml_is_refused() -> None:
    message = _message(None, text="inputs: [\n  {name: x\n")
    assert "not valid YAML" in message


def test_unknown_key_is_refused() -> None:
    message = _message(_doc(colour="red"))
    assert "colour" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_key_inside_a_tensor_is_refused() -> None:
    doc = _doc()
    doc["outputs"] = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2],
                       "dtype": "float"}]
    assert "outputs.0.dtype" in _message(doc)


def test_shape_below_minus_one_is_refused() -> None:
    doc = _doc()
    doc["inputs"] = [{"name": "features", "datatype": "FP32", "shape": [-2, 3]}]
    assert "inputs.0.shape.0" in _message(doc)


def test_missing_inputs_is_refused() -> None:
    doc = _doc()
    del doc["inputs"]
    assert "inputs" in _message(doc)


# --- ModelRepository ----------------------------------------------------------------


def _touch_version(root: Path, name: str, version: str, *, onnx: bool = True,
                   spec: bool = True) -> None:
    """A version directory; the repository itself never opens the ONNX file."""
    target = root / name / version
    target.mkdir(parents=True, exist_ok=True)
    if onnx:
        (target / "model.onnx").write_bytes(b"not read by the repository")
    if spec:
        (target / "model.yaml").write_text(dump_spec(_spec()))


def test_model_names_lists_complete_models_only(tmp_path: Path) -> None:
    write_linear_model(tmp_path, "linear", "1")
    _touch_version(tmp_path, "spec_only", "1", onnx=False)
    _touch_version(tmp_path, "onnx_only", "1", spec=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden").mkdir()
    _touch_version(tmp_path, ".hidden", "1")
    _touch_version(tmp_path, "_private", "1")
    _touch_version(tmp_path, "junkversion", ".1")
    (tmp_path / "README.md").write_text("not a model")
    (tmp_path / "mixed").mkdir()
    _touch_version(tmp_path, "mixed", "1", spec=False)
    _touch_version(tmp_path, "mixed", "2")
    assert ModelRepository(tmp_path).model_names() == ["linear", "mixed"]


def test_versions_ignore_incomplete_ones(tmp_path: Path) -> None:
    _touch_version(tmp_path, "m", "1")
    _touch_version(tmp_path, "m", "2", spec=False)
    _touch_version(tmp_path, "m", "3", onnx=False)
    (tmp_path / "m" / "notes.txt").write_text("a file, not a version")
    repository = ModelRepository(tmp_path)
    assert repository.versions("m") == ["1"]
    assert repository.latest_version("m") == "1"


def test_versions_sort_numerically(tmp_path: Path) -> None:
    for version in ["10", "9", "2", "100", "beta", "alpha"]:
        _touch_version(tmp_path, "m", version)
    repository = ModelRepository(tmp_path)
    assert repository.versions("m") == ["2", "9", "10", "100", "alpha", "beta"]
    assert sorted(["10", "9"], key=version_key) == ["9", "10"]


def test_latest_version_is_the_highest_number(tmp_path: Path) -> None:
    for version in ["9", "10"]:
        _touch_version(tmp_path, "m", version)
    assert ModelRepository(tmp_path).latest_version("m") == "10"


def test_spec_defaults_to_the_latest_version(model_root: Path) -> None:
    repository = ModelRepository(model_root)
    spec = repository.spec("linear")
    assert spec.version == "2"
    assert spec.labels == {"seed": "1"}
    assert repository.spec("linear", "1").labels == {"seed": "0"}
    assert repository.model_path("linear", "1") == model_root / "linear" / "1" / "model.onnx"


def test_spec_of_a_broken_file_names_the_file(model_root: Path) -> None:
    path = model_root / "linear" / "2" / "model.yaml"
    path.write_text("inputs: 3\noutputs: []\n")
    with pytest.raises(ConfigError) as info:
        ModelRepository(model_root).spec("linear", "2")
    assert str(path) in info.value.message
    assert "inputs" in info.value.message


def test_model_names_of_a_missing_root_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        ModelRepository(tmp_path / "nope").model_names()


def test_unknown_model_is_not_found(repository: ModelRepository) -> None:
    with pytest.raises(ModelNotFound, match="'nope'"):
        repository.versions("nope")
    with pytest.raises(ModelNotFound, match="'nope'"):
        repository.spec("nope", "1")
    with pytest.raises(ModelNotFound, match="'nope'"):
        repository.latest_version("nope")


def test_model_without_complete_version_is_not_found(model_root: Path) -> None:
    _touch_version(model_root, "half", "1", spec=False)
    with pytest.raises(ModelNotFound, match="'half'"):
        ModelRepository(model_root).versions("half")


def test_unknown_version_is_not_found(repository: ModelRepository) -> None:
    with pytest.raises(ModelNotFound, match="'7'"):
        repository.spec("linear", "7")
    with pytest.raises(ModelNotFound, match="'7'"):
        repository.model_path("linear", "7")


def test_incomplete_version_is_not_found(model_root: Path) -> None:
    (model_root / "linear" / "2" / "model.onnx").unlink()
    repository = ModelRepository(model_root)
    with pytest.raises(ModelNotFound, match=r"model\.onnx"):
        repository.model_path("linear", "2")
    assert repository.versions("linear") == ["1"]


@pytest.mark.parametrize("name", ["../x", "..", ".", "linear/../nanok", "/etc", "", "a b",
                                  "x" * 200])
def test_bad_model_names_are_not_found(model_root: Path, name: str) -> None:
    (model_root.parent / "x" / "1").mkdir(parents=True)
    repository = ModelRepository(model_root)
    with pytest.raises(ModelNotFound):
        repository.versions(name)
    with pytest.raises(ModelNotFound):
        repository.spec(name, "1")


@pytest.mark.parametrize("version", ["../1", "..", ".", "1/../2", "/1"])
def test_bad_versions_are_not_found(repository: ModelRepository, version: str) -> None:
    with pytest.raises(ModelNotFound):
        repository.spec("linear", version)
    with pytest.raises(ModelNotFound):
        repository.model_path("linear", version)
