"""A real outside client: tritonclient[http] against the running Keel application."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support.serve_app import KeelApp

pytestmark = pytest.mark.slow

DEMO_MODELS = ["risk_mlp", "risk_gbdt", "risk_mlp_int8"]
#: Largest |P_int8 - P_fp32| accepted; the builder measures ~0.01 on its holdout.
INT8_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def client(keel_app: KeelApp) -> Any:
    url = keel_app.base_url.removeprefix("http://")
    c = triton.InferenceServerClient(url=url, network_timeout=60.0)
    yield c
    c.close()


def features(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 12)).astype(np.float32)


def infer(client: Any, name: str, x: np.ndarray, *, binary: bool) -> Any:
    tensor = triton.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary),
               triton.InferRequestedOutput("label", binary_data=binary)]
    return client.infer(name, inputs=[tensor], outputs=outputs, request_id="tc-1")


def test_server_live_ready_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "keel"


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_model_metadata_ready_and_infer(client: Any, name: str) -> None:
    assert client.is_model_ready(name)
    assert client.is_model_ready(name, "1")
    meta = client.get_model_metadata(name)
    assert meta["name"] == name
    assert meta["inputs"][0]["name"] == "features"
    x = features(8, seed=11)
    json_result = infer(client, name, x, binary=False)
    binary_result = infer(client, name, x, binary=True)
    for result in (json_result, binary_result):
        probs = result.as_numpy("probabilities")
        labels = result.as_numpy("label")
        assert probs.shape == (8, 2) and labels.shape == (8,)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert result.get_response()["model_version"] == "1"
        assert result.get_response()["id"] == "tc-1"
    np.testing.assert_array_equal(json_result.as_numpy("probabilities"),
                                  binary_result.as_numpy("probabilities"))


def test_int8_within_tolerance_of_fp32(client: Any) -> None:
    # Rows from the demo's own data distribution: that is what the tolerance is about.
    from graph.demo.dataset import DatasetConfig, generate, training_matrix

    x = training_matrix(generate(DatasetConfig(seed=12, n_train_rows=256)))[0][:256]
    fp32 = infer(client, "risk_mlp", x, binary=True).as_numpy("probabilities")
    int8 = infer(client, "risk_mlp_int8", x, binary=True).as_numpy("probabilities")
    assert np.abs(fp32 - int8).max() <= INT8_TOLERANCE
    assert not np.array_equal(fp32, int8), "the INT8 model must be a different model"


def test_errors_reach_the_client(client: Any) -> None:
    with pytest.raises(InferenceServerException, match="nope"):
        client.get_model_metadata("nope")
    tensor = triton.InferInput("features", [1, 11], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 11), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="features"):
        client.infer("risk_mlp", inputs=[tensor])
    assert not client.is_model_ready("nope")
