"""The CloudWatch export inside real Ray Serve replicas: a second application with
``KEEL_CLOUDWATCH_SINK=emf`` in its runtime_env writes EMF documents for the requests it
answers (the unit tests cover the formats, PutMetricData and the faults)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from deployments.observability import catalog
from tests.support.emf import assert_emf
from tests.support.serve_app import KeelApp, serve_test_config

pytestmark = pytest.mark.slow

APP = "keel-cw"
PREFIX = "/cw"
ROUTE = "/v2/models/{name}/infer"


def _body(i: int) -> dict[str, Any]:
    x = np.random.default_rng(2000 + i).normal(size=(1, 4)).astype(np.float32)
    return {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}


@pytest.fixture(scope="module")
def emf_app(keel_app: KeelApp, model_repo: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A second application whose replicas export to an EMF file every second."""
    emf = tmp_path_factory.mktemp("cloudwatch") / "emf.log"
    app = serve_test_config(model_repo)["applications"][0]
    app.update(name=APP, route_prefix=PREFIX)
    app["args"]["models"] = ["linear"]
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("Ingress", "SloMonitor", "linear")]
    env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
    env.update({"KEEL_CLOUDWATCH_SINK": "emf", "KEEL_CLOUDWATCH_EMF_FILE": str(emf),
                "KEEL_CLOUDWATCH_FLUSH_INTERVAL_S": "1"})
    with keel_app.alongside(app) as url:
        yield url, emf


def _documents(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_replicas_write_emf_documents_for_real_requests(emf_app: tuple[str, Path]) -> None:
    url, emf = emf_app
    n = 25
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            assert client.post(f"{url}/v2/models/linear/infer",
                               json=_body(i)).status_code == 200
    deadline = time.monotonic() + 60
    requests = latency = 0.0
    slo_seen = False
    docs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        docs = _documents(emf)
        ours = [d for d in docs if d.get("application") == APP]
        requests = sum(d[catalog.REQUESTS.name] for d in ours
                       if catalog.REQUESTS.name in d and d.get("http_route") == ROUTE
                       and d.get("model") == "linear" and d.get("status") == "200")
        latency = sum(d[catalog.REQUEST_LATENCY.name]["Count"] for d in ours
                      if catalog.REQUEST_LATENCY.name in d and d.get("model") == "linear")
        slo_seen = any(catalog.SLO_VALUE.name in d for d in ours)
        if requests >= n and latency >= n and slo_seen:
            break
        time.sleep(1)
    assert requests == n, f"request counter: {requests} of {n}"
    assert latency == n, f"latency histogram count: {latency} of {n}"
    assert slo_seen, "the SloMonitor replica exports its gauges too"
    for doc in docs:
        declared = assert_emf(doc)
        assert all(namespace == "Keel" for namespace, _, _ in declared)
    # the main application has no CloudWatch settings: nothing of it is written
    assert not [d for d in docs if d.get("application") == "keel"]
