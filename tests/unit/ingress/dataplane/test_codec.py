"""Open Inference Protocol codecs: JSON and binary tensor data <-> numpy, and every refusal."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from deployments.contracts import InferenceRequest
from deployments.errors import InvalidInput
from deployments.ingress.dataplane.codec import (
    decode_inputs,
    encode_response,
    model_metadata,
    parse_request,
    requested_outputs,
    wants_binary,
)
from deployments.repository import ModelSpec, TensorSpec

X = TensorSpec(name="x", datatype="FP32", shape=[-1, 4])
Y = TensorSpec(name="y", datatype="FP32", shape=[-1, 2])
LABEL = TensorSpec(name="label", datatype="INT64", shape=[-1])


def _spec(*inputs: TensorSpec, outputs: list[TensorSpec] | None = None) -> ModelSpec:
    return ModelSpec(name="m", version="1", inputs=list(inputs) or [X],
                     outputs=outputs or [Y, LABEL])


def _input(name: str = "x", shape: list[int] | None = None, datatype: str = "FP32",
           data: Any = None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"name": name, "shape": shape if shape is not None else [1, 4],
                            "datatype": datatype}
    if data is not None:
        item["data"] = data
    item.update(extra)
    return item


def _decode(payload: dict[str, Any], spec: ModelSpec) -> dict[str, np.ndarray]:
    request, tail = parse_request(json.dumps(payload).encode())
    return decode_inputs(request, spec, tail)


def _binary_body(inputs: list[tuple[dict[str, Any], bytes | None]],
                 **payload: Any) -> tuple[bytes, int]:
    """A body the way tritonclient builds it: JSON header, then each tensor's raw bytes."""
    items, blobs = [], []
    for item, blob in inputs:
        if blob is not None:
            item = {**item, "parameters": {**item.get("parameters", {}),
                                           "binary_data_size": len(blob)}}
            blobs.append(blob)
        items.append(item)
    head = json.dumps({**payload, "inputs": items}, separators=(",", ":")).encode()
    return head + b"".join(blobs), len(head)


def _refused(payload: dict[str, Any], spec: ModelSpec, *parts: str,
             binary: bytes = b"") -> str:
    body = json.dumps(payload).encode()
    with pytest.raises(InvalidInput) as info:
        request, _ = parse_request(body)
        decode_inputs(request, spec, binary)
    message = info.value.message
    for part in parts:
        assert part in message, message
    return message


# --- JSON decoding ----------------------------------------------------------------------


def test_decode_fp32() -> None:
    data = [0.5, -1.25, 3.0, 1e-3, 2.0, 4.0, 8.0, 16.0]
    arrays = _decode({"inputs": [_input(shape=[2, 4], data=data)]}, _spec())
    assert list(arrays) == ["x"]
    assert arrays["x"].dtype == np.float32
    assert arrays["x"].shape == (2, 4)
    np.testing.assert_array_equal(arrays["x"], np.array(data, np.float32).reshape(2, 4))


def test_decode_int64_bool_fp64_uint8_together() -> None:
    spec = _spec(
        TensorSpec(name="ids", datatype="INT64", shape=[-1]),
        TensorSpec(name="mask", datatype="BOOL", shape=[-1, 2]),
        TensorSpec(name="price", datatype="FP64", shape=[-1]),
        TensorSpec(name="pixels", datatype="UINT8", shape=[-1, 3]),
    )
    payload = {"inputs": [
        _input("ids", [3], "INT64", [2**40, -7, 0]),
        _input("mask", [1, 2], "BOOL", [True, False]),
        _input("price", [2], "FP64", [0.1, 1e300]),
        _input("pixels", [1, 3], "UINT8", [0, 128, 255]),
    ]}
    arrays = _decode(payload, spec)
    assert arrays["ids"].dtype == np.int64
    assert arrays["ids"].tolist() == [2**40, -7, 0]
    assert arrays["mask"].dtype == np.bool_
    assert arrays["mask"].tolist() == [[True, False]]
    assert arrays["price"].dtype == np.float64
    assert arrays["price"].tolist() == [0.1, 1e300]
    assert arrays["pixels"].dtype == np.uint8
    assert arrays["pixels"].tolist() == [[0, 128, 255]]


def test_decode_int8_limits() -> None:
    spec = _spec(TensorSpec(name="q", datatype="INT8", shape=[-1]))
    arrays = _decode({"inputs": [_input("q", [2], "INT8", [-128, 127])]}, spec)
    assert arrays["q"].dtype == np.int8
    assert arrays["q"].tolist() == [-128, 127]


def test_decode_accepts_integers_for_floats() -> None:
    arrays = _decode({"inputs": [_input(data=[1, 2, 3, 4])]}, _spec())
    assert arrays["x"].dtype == np.float32
    assert arrays["x"].tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_decode_nested_data() -> None:
    arrays = _decode({"inputs": [_input(shape=[2, 4], data=[[1, 2, 3, 4], [5, 6, 7, 8]])]},
                     _spec())
    assert arrays["x"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_decode_bytes() -> None:
    spec = _spec(TensorSpec(name="s", datatype="BYTES", shape=[-1]))
    arrays = _decode({"inputs": [_input("s", [2], "BYTES", ["AAPL", "héllo"])]}, spec)
    assert arrays["s"].tolist() == [b"AAPL", "héllo".encode()]


def test_decode_inputs_in_any_order() -> None:
    spec = _spec(TensorSpec(name="a", datatype="FP32", shape=[-1]),
                 TensorSpec(name="b", datatype="INT64", shape=[-1]))
    arrays = _decode({"inputs": [_input("b", [1], "INT64", [3]),
                                 _input("a", [1], "FP32", [0.5])]}, spec)
    assert arrays["a"].tolist() == [0.5]
    assert arrays["b"].tolist() == [3]


def test_unknown_parameters_are_ignored() -> None:
    payload = {
        "id": "req-1",
        "parameters": {"priority": 3, "custom": {"nested": True}},
        "inputs": [_input(data=[1, 2, 3, 4], parameters={"binary_data": False, "foo": "bar"})],
        "outputs": [{"name": "y", "parameters": {"binary_data": False, "classification": 0}}],
        "extra_field": "tolerated",
    }
    arrays = _decode(payload, _spec())
    assert arrays["x"].tolist() == [[1, 2, 3, 4]]


def test_nan_and_infinity_accepted_with_allow_nan() -> None:
    spec = _spec(TensorSpec(name="x", datatype="FP32", shape=[-1, 4], allow_nan=True))
    body = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32",' \
           b'"data":[NaN, Infinity, -Infinity, 1.5]}]}'
    request, tail = parse_request(body)
    x = decode_inputs(request, spec, tail)["x"]
    assert math.isnan(x[0, 0])
    assert x[0, 1] == np.inf and x[0, 2] == -np.inf
    assert x[0, 3] == 1.5


# --- binary tensor data extension -------------------------------------------------------


def test_binary_input_decodes_to_the_same_array() -> None:
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    body, json_length = _binary_body([(_input(shape=[3, 4]), x.astype("<f4").tobytes())],
                                     id="b1")
    request, tail = parse_request(body, json_length)
    assert request.id == "b1"
    assert len(tail) == x.nbytes
    decoded = decode_inputs(request, _spec(), tail)["x"]
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, x)


def test_binary_and_json_inputs_mixed() -> None:
    spec = _spec(TensorSpec(name="a", datatype="FP32", shape=[-1, 2]),
                 TensorSpec(name="b", datatype="INT64", shape=[-1]),
                 TensorSpec(name="c", datatype="FP64", shape=[-1]),
                 TensorSpec(name="d", datatype="BOOL", shape=[-1]))
    a = np.array([[1.5, -2.0], [3.25, 4.0]], np.float32)
    c = np.array([0.1, 0.2, 0.3])
    d = np.array([True, False, True])
    body, json_length = _binary_body([
        (_input("a", [2, 2], "FP32"), a.astype("<f4").tobytes()),
        (_input("b", [2], "INT64", [7, -8]), None),
        (_input("c", [3], "FP64"), c.astype("<f8").tobytes()),
        (_input("d", [3], "BOOL"), d.tobytes()),
    ])
    request, tail = parse_request(body, json_length)
    arrays = decode_inputs(request, spec, tail)
    np.testing.assert_array_equal(arrays["a"], a)
    assert arrays["b"].tolist() == [7, -8]
    np.testing.assert_array_equal(arrays["c"], c)
    assert arrays["d"].dtype == np.bool_
    assert arrays["d"].tolist() == [True, False, True]


def test_binary_bytes_input() -> None:
    spec = _spec(TensorSpec(name="s", datatype="BYTES", shape=[-1]))
    values = [b"AAPL", b"", b"MSFT"]
    blob = b"".join(len(v).to_bytes(4, "little") + v for v in values)
    body, json_length = _binary_body([(_input("s", [3], "BYTES"), blob)])
    request, tail = parse_request(body, json_length)
    assert decode_inputs(request, spec, tail)["s"].tolist() == values


def test_binary_body_built_by_tritonclient() -> None:
    import tritonclient.http as triton

    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    tensor = triton.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    body, json_length = triton.InferenceServerClient.generate_request_body(
        [tensor], [triton.InferRequestedOutput("y", binary_data=True)], request_id="t1")
    request, tail = parse_request(body, json_length)
    np.testing.assert_array_equal(decode_inputs(request, _spec(), tail)["x"], x)
    assert request.id == "t1"
    assert wants_binary(request, "y") is True
    assert wants_binary(request, "label") is False


def test_binary_output_round_trip() -> None:
    request = InferenceRequest.model_validate({
        "id": "r7",
        "inputs": [_input(data=[1, 2, 3, 4])],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "label"}],
    })
    y = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    label = np.array([1, 0], np.int64)
    body, json_length = encode_response(request, _spec(), "1", {"y": y, "label": label})
    assert json_length is not None
    head = json.loads(body[:json_length])
    assert head["model_name"] == "m"
    assert head["model_version"] == "1"
    assert head["id"] == "r7"
    out_y, out_label = head["outputs"]
    assert out_y == {"name": "y", "datatype": "FP32", "shape": [2, 2],
                     "parameters": {"binary_data_size": 16}}
    assert out_label == {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]}
    tail = body[json_length:]
    assert len(tail) == 16
    np.testing.assert_array_equal(np.frombuffer(tail, "<f4").reshape(2, 2), y)


def test_binary_output_for_all_outputs_by_request_parameter() -> None:
    request = InferenceRequest.model_validate({
        "parameters": {"binary_data_output": True},
        "inputs": [_input(data=[1, 2, 3, 4])],
    })
    y = np.array([[0.25, 0.75]], np.float32)
    label = np.array([1], np.int64)
    body, json_length = encode_response(request, _spec(), "1", {"y": y, "label": label})
    assert json_length is not None
    head = json.loads(body[:json_length])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [8, 8]
    tail = body[json_length:]
    np.testing.assert_array_equal(np.frombuffer(tail[:8], "<f4"), y.reshape(-1))
    assert np.frombuffer(tail[8:], "<i8").tolist() == [1]


# --- encoding -----------------------------------------------------------------------------


def test_encode_json_response_echoes_the_id() -> None:
    request = InferenceRequest.model_validate({"id": "abc-42", "inputs": [_input(data=[0] * 4)]})
    y = np.array([[0.125, 0.875]], np.float32)
    body, json_length = encode_response(request, _spec(), "3", {"y": y})
    assert json_length is None
    assert json.loads(body) == {
        "model_name": "m", "model_version": "3", "id": "abc-42",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [0.125, 0.875]}],
    }


def test_encode_json_response_without_id() -> None:
    request = InferenceRequest.model_validate({"inputs": [_input(data=[0] * 4)]})
    body, _ = encode_response(request, _spec(), "1", {"label": np.array([3], np.int64)})
    document = json.loads(body)
    assert "id" not in document
    assert document["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [1],
                                    "data": [3]}]


def test_nan_outputs_encode_as_null() -> None:
    request = InferenceRequest.model_validate({"inputs": [_input(data=[0] * 4)]})
    y = np.array([[np.nan, 0.5], [np.inf, -np.inf]], np.float32)
    body, _ = encode_response(request, _spec(), "1", {"y": y})

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not valid JSON")

    document = json.loads(body, parse_constant=refuse)
    assert document["outputs"][0]["data"] == [None, 0.5, None, None]


def test_requested_outputs() -> None:
    spec = _spec()
    none = InferenceRequest.model_validate({"inputs": [_input(data=[0] * 4)]})
    assert requested_outputs(none, spec) is None
    some = InferenceRequest.model_validate({"inputs": [_input(data=[0] * 4)],
                                            "outputs": [{"name": "label"}]})
    assert requested_outputs(some, spec) == ["label"]
    bad = InferenceRequest.model_validate({"inputs": [_input(data=[0] * 4)],
                                           "outputs": [{"name": "logits"}]})
    with pytest.raises(InvalidInput, match="'logits'"):
        requested_outputs(bad, spec)


def test_model_metadata_document() -> None:
    assert model_metadata(_spec(), ["1", "2"]) == {
        "name": "m",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]}],
    }


# --- refusals -------------------------------------------------------------------------------

INT8 = TensorSpec(name="q", datatype="INT8", shape=[-1])
UINT8 = TensorSpec(name="p", datatype="UINT8", shape=[-1])
INT64 = TensorSpec(name="n", datatype="INT64", shape=[-1])
BOOL = TensorSpec(name="flag", datatype="BOOL", shape=[-1])
FIXED = TensorSpec(name="x", datatype="FP32", shape=[1, 4])


@pytest.mark.parametrize(
    ("inputs", "items", "parts"),
    [
        ([X], [_input("z", data=[0] * 4)], ["'z'", "not an input", "'x'"]),
        ([X, INT64], [_input(data=[0] * 4)], ["'n'", "missing"]),
        ([X], [_input(data=[0] * 4), _input(data=[1] * 4)], ["'x'", "given twice"]),
        ([X], [_input(datatype="FP64", data=[0] * 4)], ["'x'", "FP64", "FP32"]),
        ([X], [_input(shape=[4], data=[0] * 4)], ["'x'", "shape [4]"]),
        ([X], [_input(shape=[1, 2, 2], data=[0] * 4)], ["'x'", "shape [1, 2, 2]"]),
        ([X], [_input(shape=[2, 2], data=[0] * 4)], ["'x'", "shape [2, 2]"]),
        ([FIXED], [_input(shape=[2, 4], data=[0] * 8)], ["'x'", "shape [2, 4]"]),
        ([X], [_input(shape=[2, 4], data=[0] * 7)], ["'x'", "7 elements", "8"]),
        ([X], [_input(shape=[1, 4], data=[[0] * 4, [0] * 4])], ["'x'", "8 elements"]),
        ([X], [_input(data=[1, "a", 2, 3])], ["'x'", "numbers"]),
        ([X], [_input(data=["1", "2", "3", "4"])], ["'x'", "numbers"]),
        ([X], [_input(data=[1, None, 2, 3])], ["'x'", "numbers"]),
        ([X], [_input(data=[1, {"a": 1}, 2, 3])], ["'x'", "numbers"]),
        ([X], [_input(shape=[2, 4], data=[[1, 2, 3, 4], [5, 6, 7]])], ["'x'"]),
        ([INT64], [_input("n", [2], "INT64", [1, 2.5])], ["'n'", "integers"]),
        ([INT64], [_input("n", [1], "INT64", [1.0])], ["'n'", "integers"]),
        ([INT64], [_input("n", [1], "INT64", [2**63])], ["'n'", "outside the range"]),
        ([INT8], [_input("q", [2], "INT8", [1, 128])], ["'q'", "outside the range", "INT8"]),
        ([INT8], [_input("q", [1], "INT8", [-129])], ["'q'", "outside the range"]),
        ([UINT8], [_input("p", [1], "UINT8", [256])], ["'p'", "outside the range", "UINT8"]),
        ([UINT8], [_input("p", [1], "UINT8", [-1])], ["'p'", "outside the range"]),
        ([BOOL], [_input("flag", [2], "BOOL", [1, 0])], ["'flag'", "true/false"]),
        ([X], [_input(data=[True, False, True, False])], ["'x'", "not booleans"]),
        ([X], [_input(data=[float("nan"), 0, 0, 0])], ["'x'", "NaN", "[0, 0]"]),
        ([X], [_input(data=[0, 0, float("inf"), 0])], ["'x'", "infinite", "[0, 2]"]),
        ([X], [_input(data=[0, 0, 0, float("-inf")])], ["'x'", "infinite"]),
        ([X], [_input(data=[0, 1e40, 0, 0])], ["'x'", "outside the range", "[0, 1]"]),
        ([X], [_input(shape=[-1, 4], data=[0] * 4)], ["'x'", "negative"]),
        ([X], [_input(shape=[0, 4], data=[])], ["'x'", "batch dimension is 0"]),
        ([X], [_input()], ["'x'", "no data"]),
        ([X], [_input(data=[0] * 4, parameters={"binary_data_size": 16})], ["'x'", "both"]),
        ([X], [_input(parameters={"binary_data_size": -1})], ["'x'", "non-negative"]),
        ([X], [_input(parameters={"binary_data_size": True})], ["'x'", "non-negative"]),
        ([X], [_input(parameters={"binary_data_size": "16"})], ["'x'", "non-negative"]),
    ],
    ids=["unknown-input", "missing-input", "twice", "datatype", "rank-low", "rank-high",
         "columns", "fixed-dim", "length", "nested-length", "string-in-data", "strings",
         "null-in-data", "object-in-data", "ragged", "float-for-int64", "float-literal-int64",
         "int64-overflow", "int8-high", "int8-low", "uint8-high", "uint8-negative",
         "ints-for-bool", "bools-for-fp32", "nan", "inf", "minus-inf", "fp32-overflow",
         "negative-shape",
         "zero-batch", "no-data", "data-and-binary", "negative-binary-size",
         "bool-binary-size", "string-binary-size"],
)
def test_bad_input_is_refused_naming_it(inputs: list[TensorSpec], items: list[dict[str, Any]],
                                        parts: list[str]) -> None:
    _refused({"inputs": items}, _spec(*inputs), *parts)


def test_fp16_overflow_is_refused() -> None:
    spec = _spec(TensorSpec(name="h", datatype="FP16", shape=[-1]))
    _refused({"inputs": [_input("h", [1], "FP16", [70000.0])]}, spec, "'h'", "outside the range")
    arrays = _decode({"inputs": [_input("h", [1], "FP16", [65504.0])]}, spec)
    assert arrays["h"].tolist() == [65504.0]


def test_nan_literal_in_the_body_is_refused() -> None:
    # json.loads accepts NaN and Infinity; the codec must still refuse them.
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,' + \
            literal + b',2,3]}]}'
        request, tail = parse_request(body)
        with pytest.raises(InvalidInput, match="'x'"):
            decode_inputs(request, _spec(), tail)


def test_binary_data_size_past_the_body() -> None:
    x = np.zeros((1, 4), np.float32)
    body, json_length = _binary_body([(_input(), x.tobytes())])
    truncated = body[:-4]
    request, tail = parse_request(truncated, json_length)
    with pytest.raises(InvalidInput) as info:
        decode_inputs(request, _spec(), tail)
    assert "'x'" in info.value.message
    assert "runs past" in info.value.message


def test_binary_size_that_does_not_match_the_shape() -> None:
    body, json_length = _binary_body([(_input(), np.zeros(3, np.float32).tobytes())])
    request, tail = parse_request(body, json_length)
    with pytest.raises(InvalidInput) as info:
        decode_inputs(request, _spec(), tail)
    assert "'x'" in info.value.message
    assert "12 bytes" in info.value.message and "16" in info.value.message


def test_binary_nan_is_refused() -> None:
    x = np.array([[0, np.nan, 0, 0]], np.float32)
    body, json_length = _binary_body([(_input(), x.tobytes())])
    request, tail = parse_request(body, json_length)
    with pytest.raises(InvalidInput, match=r"'x'.*NaN"):
        decode_inputs(request, _spec(), tail)


def test_unclaimed_trailing_binary_bytes() -> None:
    x = np.zeros((1, 4), np.float32)
    body, json_length = _binary_body([(_input(), x.tobytes())])
    request, tail = parse_request(body + b"\x00\x01\x02", json_length)
    with pytest.raises(InvalidInput, match="3 bytes of binary data are not claimed"):
        decode_inputs(request, _spec(), tail)


def test_binary_tail_with_json_inputs_only() -> None:
    head = json.dumps({"inputs": [_input(data=[0] * 4)]}).encode()
    request, tail = parse_request(head + b"junk", len(head))
    with pytest.raises(InvalidInput, match="4 bytes"):
        decode_inputs(request, _spec(), tail)


@pytest.mark.parametrize("json_length", [-1, 10_000])
def test_json_length_outside_the_body(json_length: int) -> None:
    with pytest.raises(InvalidInput, match="inference-header-content-length"):
        parse_request(b'{"inputs": []}', json_length)


def test_truncated_bytes_element() -> None:
    spec = _spec(TensorSpec(name="s", datatype="BYTES", shape=[-1]))
    blob = (10).to_bytes(4, "little") + b"short"
    body, json_length = _binary_body([(_input("s", [1], "BYTES"), blob)])
    request, tail = parse_request(body, json_length)
    with pytest.raises(InvalidInput, match=r"'s'.*truncated"):
        decode_inputs(request, spec, tail)


@pytest.mark.parametrize(
    ("body", "part"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b'"inputs"', "JSON object"),
        (b"42", "JSON object"),
        (b"null", "JSON object"),
        (b'{"id": "x"}', "inputs"),
        (b'{"inputs": []}', "inputs"),
        (b'{"inputs": {"name": "x"}}', "inputs"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}', "inputs.0.shape"),
        (b'{"inputs": [{"name": "x", "shape": "1,4", "datatype": "FP32"}]}', "inputs.0.shape"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": 1}]}',
         "inputs.0.data"),
    ],
    ids=["malformed", "empty", "not-utf8", "array", "string", "number", "null", "no-inputs",
         "empty-inputs", "inputs-object", "no-shape", "shape-string", "data-scalar"],
)
def test_malformed_request_is_invalid_input(body: bytes, part: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_request(body)
    assert part in info.value.message


def test_deeply_nested_json_is_invalid_input() -> None:
    # A 20 kB body must get a 400, not an unhandled RecursionError (500).
    body = b"[" * 10_000 + b"]" * 10_000
    with pytest.raises(InvalidInput, match="JSON"):
        parse_request(body)
