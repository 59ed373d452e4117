"""The ingress's request measurement and ``/v1/slo``, in process (real models, no Ray)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deployments.ingress.rest.app import create_app
from deployments.observability.slo import MODEL, Recorder, SloBook, SloObserver, SloReport
from tests.support.inprocess import InProcessModels, MutableIngressConfig


class LocalSlo:
    """What the SloMonitor does, in this process: merge the recorder, evaluate."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.book = SloBook()

    async def report(self) -> SloReport:
        self.book.add(self.recorder.drain(), "test")
        return self.book.report()


class RecordingObserver(SloObserver):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__(recorder)
        self.requests: list[tuple[str, str, int]] = []

    def request(self, http_route: str, model: str, status: int, latency_ms: float,
                version: str = "") -> None:
        super().request(http_route, model, status, latency_ms)
        self.requests.append((http_route, model, status))


@pytest.fixture
def observed(backend: InProcessModels, ingress_config: MutableIngressConfig
             ) -> Iterator[tuple[TestClient, RecordingObserver]]:
    recorder = Recorder()
    observer = RecordingObserver(recorder)
    app = create_app(backend, ingress_config, observer=observer, slo=LocalSlo(recorder))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, observer


def _body(n: int) -> dict:
    x = np.random.default_rng(n).normal(size=(n, 4)).astype(np.float32)
    return {"inputs": [{"name": "features", "shape": [n, 4], "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}


def test_every_request_is_measured_with_its_route_template_model_and_status(
        observed: tuple[TestClient, RecordingObserver]) -> None:
    client, observer = observed
    assert client.post("/v2/models/linear/infer", json=_body(2)).status_code == 200
    assert client.post("/v2/models/linear/infer", json={"inputs": []}).status_code == 400
    assert client.post("/v2/models/nope/infer", json=_body(1)).status_code == 404
    assert client.post("/v1/decide", json={"model": "linear", "entities": [{}]}).status_code \
        == 503  # no feature store in this app
    assert client.get("/v2/models/linear").status_code == 200
    assert client.get("/v2/nowhere").status_code == 404
    assert observer.requests == [
        ("/v2/models/{name}/infer", "linear", 200),
        ("/v2/models/{name}/infer", "linear", 400),
        ("/v2/models/{name}/infer", "nope", 404),
        ("/v1/decide", "linear", 503),
        ("/v2/models/{name}", "linear", 200),
        ("unmatched", "", 404),
    ]


def test_slo_report_counts_serving_requests_and_model_calls(
        observed: tuple[TestClient, RecordingObserver]) -> None:
    client, _ = observed
    for n in range(1, 6):
        assert client.post("/v2/models/linear/infer", json=_body(n)).status_code == 200
    assert client.post("/v2/models/linear/infer", json={"inputs": []}).status_code == 400
    client.get("/v2/health/ready")  # not a serving route: not judged
    report = client.get("/v1/slo").json()
    assert report["sources"] == 1
    by_name = {o["name"]: o for o in report["objectives"]}
    assert set(by_name) == {"api_p50", "api_p95", "model_p95", "success", "cache_hit_ratio"}
    api = by_name["api_p95"]["windows"]["1m"]
    assert api["events"] == 6 and api["value"] > 0
    assert by_name["success"]["windows"]["1m"]["value"] == 1.0  # a 400 is not a failure
    assert by_name["model_p95"]["windows"]["1m"]["events"] == 5
    assert by_name["cache_hit_ratio"]["windows"]["1m"]["events"] == 0  # no cache here
    assert by_name["api_p95"]["target"] == 80 and by_name["success"]["target"] == 0.999


def test_a_failing_observer_never_fails_a_request(backend: InProcessModels,
                                                  ingress_config: MutableIngressConfig) -> None:
    class Broken(SloObserver):
        def request(self, http_route: str, model: str, status: int, latency_ms: float,
                version: str = "") -> None:
            raise RuntimeError("metrics backend down")

    app = create_app(backend, ingress_config, observer=Broken(Recorder()))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/v2/models/linear/infer", json=_body(1)).status_code == 200
        assert client.post("/v2/models/linear/infer", json=_body(1)).status_code == 200
        assert client.get("/v1/slo").status_code == 503  # no monitor configured


def test_model_calls_are_recorded_with_failures() -> None:
    recorder = Recorder()
    observer = SloObserver(recorder)
    observer.model_call("m", 12.0, True)
    observer.model_call("m", 70.0, False)
    [slot] = recorder.drain().values()
    assert (slot[MODEL].total, slot[MODEL].good) == (2, 1)
