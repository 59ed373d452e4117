"""Small real ONNX models written with onnx.helper, for tests that need no training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deployments.repository import DecisionRule, ModelSpec, TensorSpec, dump_spec


def linear_weights(n_features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_features, 2)).astype(np.float32),
            rng.normal(size=(2,)).astype(np.float32))


def write_linear_model(root: Path, name: str = "linear", version: str = "1", *,
                       n_features: int = 4, seed: int = 0, allow_nan: bool = False,
                       fixed_batch: int | None = None) -> ModelSpec:
    """softmax(x @ W + b) -> probabilities [-1, 2]; argmax -> label [-1] (INT64)."""
    weights, bias = linear_weights(n_features, seed)
    batch = fixed_batch if fixed_batch is not None else "batch"
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0),
        ],
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, n_features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 2]),
         helper.make_tensor_value_info("label", TensorProto.INT64, [batch])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    first = fixed_batch if fixed_batch is not None else -1
    spec = ModelSpec(
        name=name,
        version=version,
        description=f"linear test model (seed {seed})",
        inputs=[TensorSpec(name="features", datatype="FP32", shape=[first, n_features],
                           allow_nan=allow_nan,
                           columns=[f"test_view:f{i}" for i in range(n_features)])],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[first, 2]),
                 TensorSpec(name="label", datatype="INT64", shape=[first])],
        decision=DecisionRule(output="probabilities", index=1, threshold=0.5),
        metrics={"auc": 0.5},
        labels={"seed": str(seed)},
    )
    target = root / name / version
    target.mkdir(parents=True, exist_ok=True)
    onnx.save(model, target / "model.onnx")
    (target / "model.yaml").write_text(dump_spec(spec))
    return spec


def reference_probabilities(x: np.ndarray, seed: int) -> np.ndarray:
    """What the linear model computes, in numpy, to check answers independently."""
    weights, bias = linear_weights(x.shape[1], seed)
    logits = x.astype(np.float64) @ weights + bias
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def raw_infer_request(model: str, x: np.ndarray, *, name: str = "features",
                      datatype: str = "FP32", shape: list[int] | None = None,
                      raw: bytes | None = None, **fields: Any) -> Any:
    """A gRPC ``ModelInferRequest`` carrying ``x`` as one input's raw little-endian FP32
    contents; ``name``, ``datatype``, ``shape`` and ``raw`` override what ``x`` says (for
    bad-input tests); ``fields`` are the message's own (``id``, ``model_version``)."""
    from deployments.ingress.grpc import protocol as pb

    request = pb.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name=name, datatype=datatype,
                       shape=list(x.shape) if shape is None else shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes() if raw is None else raw)
    return request
