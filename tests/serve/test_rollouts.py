"""Weighted traffic splits between model versions on the shared Ray Serve application."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import httpx
import numpy as np
import pytest

from tests.serve.test_serving import infer_body, probabilities, rows
from tests.support.modelkit import reference_probabilities
from tests.support.redisserver import PrivateRedis
from tests.support.serve_app import KeelApp

pytestmark = pytest.mark.slow

KEYS = 300  # distinct route keys (accounts)


class KeyedLoad:
    """Client threads posting one row each under a route key, until stopped; every answer
    kept with the time it came back."""

    def __init__(self, base_url: str, x: np.ndarray, clients: int = 4) -> None:
        self.base_url = base_url
        self.x = x
        self.results: list[tuple[float, int, Any, int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, args=(k,))
                         for k in range(clients)]

    def _worker(self, offset: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as client:
            i = offset * 7919
            while not self._stop.is_set():
                row, key = i % len(self.x), f"acct-{i % KEYS}"
                answer = client.post("/v2/models/linear/infer",
                                     json=infer_body(self.x[row:row + 1]),
                                     headers={"X-Keel-Route-Key": key})
                body = answer.json() if answer.status_code == 200 else answer.text
                self.results.append((time.monotonic(), answer.status_code, body, row, key))
                i += 1

    def __enter__(self) -> KeyedLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def wait_for(self, what: str, done: Any, timeout_s: float = 60) -> float:
        deadline = time.monotonic() + timeout_s
        while not done(self.results[-40:]):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)
        return time.monotonic()


def _version(body: Any) -> str | None:
    return body.get("model_version") if isinstance(body, dict) else None


def test_a_split_changed_under_load_fails_nothing_and_holds_its_weights(
        keel_app: KeelApp) -> None:
    x = rows(64, seed=11, width=4)
    expected = {"1": reference_probabilities(x, seed=1), "2": reference_probabilities(x, seed=2)}
    original = keel_app.modified()

    def deploy(user_config: dict[str, Any]) -> None:
        config = keel_app.modified()
        dep = keel_app.deployment("linear", config)
        dep["user_config"] = {k: v for k, v in dep["user_config"].items()
                              if k not in ("version", "traffic")} | user_config
        keel_app.deploy(config)

    try:
        with KeyedLoad(keel_app.base_url, x) as load:
            time.sleep(1.0)
            deploy({"traffic": {"1": 80, "2": 20}})
            # Every ingress replica holds the model's status for status_ttl_s (1 s): the
            # split is measured from a little after its first answer on version 2.
            load.wait_for("version 2 answers", lambda last: any(_version(b) == "2"
                                                                 for _, _, b, _, _ in last))
            split_from = time.monotonic() + 2.0
            load.wait_for("1,000 answers under the split", lambda _: sum(
                t >= split_from for t, *_ in load.results) >= 1000, timeout_s=120)
            split_to = time.monotonic()
            deploy({"traffic": {"1": 0, "2": 100}})  # promote: 1 stays loaded, no traffic
            load.wait_for("only version 2", lambda last: all(
                _version(b) == "2" for _, _, b, _, _ in last))
            time.sleep(1.0)
    finally:
        keel_app.deploy(original)

    failures = [(s, b) for _, s, b, _, _ in load.results if s != 200]
    assert not failures, failures[:3]
    for _, _, body, row, _ in load.results:
        np.testing.assert_allclose(probabilities(body)[0], expected[_version(body)][row],
                                   atol=1e-5)
    split = [(key, _version(b)) for t, _, b, _, key in load.results if split_from <= t < split_to]
    shares = Counter(v for _, v in split)
    assert 0.15 < shares["2"] / len(split) < 0.25, shares
    per_key: dict[str, set[str | None]] = defaultdict(set)
    for key, version in split:
        per_key[key].add(version)
    flipped = {k: v for k, v in per_key.items() if len(v) > 1}
    assert not flipped, f"keys answered by both versions under one split: {flipped}"
    pinned = httpx.post(f"{keel_app.base_url}/v2/models/linear/versions/1/infer",
                        json=infer_body(x[:1]), timeout=30)
    assert pinned.status_code == 200 and pinned.json()["model_version"] == "1"


def test_a_split_naming_a_version_the_repository_lacks_fails_the_deploy_not_the_traffic(
        keel_app: KeelApp) -> None:
    """Ray stops a replica whose ``reconfigure()`` fails, and updates one replica at a time
    (``rolling_update_percentage``): of two replicas, the first to take the refused config
    stops, the update halts once the new config has failed its start budget, and the other
    keeps serving the old config. Every request along the way is answered."""
    from ray import serve

    from tests.support.serve_app import APP_NAME

    original = keel_app.modified()
    two = keel_app.modified()
    keel_app.deployment("linear", two)["num_replicas"] = 2
    config = copy.deepcopy(two)
    keel_app.deployment("linear", config)["user_config"]["traffic"] = {"1": 90, "7": 10}
    keel_app.deployment("linear", config)["user_config"].pop("version", None)
    x = rows(4, seed=12, width=4)
    expected = reference_probabilities(x[:1], seed=1)[0]
    answers: list[httpx.Response] = []

    def linear_status() -> tuple[str, str]:
        status = serve.status().applications[APP_NAME]
        dep = status.deployments.get("linear")
        return (str(dep.status) if dep else "", (dep.message if dep else "") or status.message)

    try:
        keel_app.deploy(two)
        keel_app.deploy(config, wait=False)
        deadline = time.monotonic() + 120
        state, message = linear_status()
        while "DEPLOY_FAILED" not in state:
            assert time.monotonic() < deadline, (state, message)
            answers.append(httpx.post(f"{keel_app.base_url}/v2/models/linear/infer",
                                      json=infer_body(x[:1]), timeout=30))
            time.sleep(0.2)
            state, message = linear_status()
        assert "traffic: version '7' of model 'linear'" in message, message
        settled = time.monotonic() + 5  # the replica left over answers from the old config
        while time.monotonic() < settled:
            answers.append(httpx.post(f"{keel_app.base_url}/v2/models/linear/infer",
                                      json=infer_body(x[:1]), timeout=30))
            time.sleep(0.1)
        failed = [(a.status_code, a.text) for a in answers if a.status_code != 200]
        assert not failed and len(answers) > 20, (failed[:3], len(answers))
        for answer in answers:
            assert answer.json()["model_version"] == "1"
            np.testing.assert_allclose(probabilities(answer.json())[0], expected, atol=1e-5)
    finally:
        keel_app.deploy(original)


def test_a_shadow_gets_a_copy_of_each_unpinned_request_after_its_answer(
        keel_app: KeelApp) -> None:
    """``linear`` serves 1 and mirrors to 2 on the model deployment (its own handle call,
    ``infer_aside``); /v1/rollouts counts every row compared and every decision flip."""
    from tests.support.serve_app import changed, stats

    x = rows(32, seed=13, width=4)
    live, shadow = reference_probabilities(x, seed=1), reference_probabilities(x, seed=2)
    flips = int(np.count_nonzero((live[:, 1] >= 0.5) != (shadow[:, 1] >= 0.5)))
    with changed(keel_app, linear={"version": "1", "shadow": {"version": "2"}}), \
            httpx.Client(base_url=keel_app.base_url, timeout=30) as client:

        def linear() -> dict[str, Any]:
            state: dict[str, Any] = client.get("/v1/rollouts").json()["models"]["linear"]
            return state

        deadline = time.monotonic() + 30
        while linear()["shadow"] is None:  # the ingress holds the status for status_ttl_s
            assert time.monotonic() < deadline, linear()
            time.sleep(0.2)
        before = {c["shadow_version"]: c for c in linear()["comparisons"]}.get("2")
        rows_before = before["rows_compared"] if before else 0
        flips_before = before["decision_flips"] if before else 0
        asides_before = stats("linear")["aside_calls"]
        for i in range(16):
            answer = client.post("/v2/models/linear/infer", json=infer_body(x[2 * i:2 * i + 2]))
            assert answer.status_code == 200 and answer.json()["model_version"] == "1"
            np.testing.assert_allclose(probabilities(answer.json()), live[2 * i:2 * i + 2],
                                       atol=1e-5)
        for _ in range(3):  # pinned: the client's choice, not mirrored
            assert client.post("/v2/models/linear/versions/1/infer",
                               json=infer_body(x[:2])).status_code == 200
        deadline = time.monotonic() + 30
        while True:
            [comparison] = [c for c in linear()["comparisons"] if c["shadow_version"] == "2"]
            if comparison["rows_compared"] - rows_before >= 32:
                break
            assert time.monotonic() < deadline, comparison
            time.sleep(0.2)
        assert comparison["rows_compared"] - rows_before == 32
        assert comparison["decision_flips"] - flips_before == flips
        assert comparison["dropped"] == {"queue_full": 0, "failed": 0}
        assert stats("linear")["aside_calls"] - asides_before == 16
        assert sorted(linear()["loaded_versions"]) == ["1", "2"]


def test_the_ingress_logs_sampled_answers_to_a_redis_stream(
        keel_app: KeelApp, cache_redis: PrivateRedis) -> None:
    """Payload logging through the real application: every answer at rate 1, in the Redis
    the prediction cache uses (the test app's private one), each record naming its model,
    version and request id."""
    import uuid

    from tests.support.serve_app import changed

    stream = f"keel-test:payloads:{uuid.uuid4().hex[:8]}"
    x = rows(3, seed=14, width=4)
    with changed(keel_app, Ingress={"payloads": {"rate": 1.0, "stream": stream}}), \
            httpx.Client(base_url=keel_app.base_url, timeout=30) as client, \
            cache_redis.client() as store:
        for i in range(3):
            answer = client.post("/v2/models/linear/infer",
                                 json=infer_body(x[i:i + 1], id=f"serve-{i}"))
            assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 15
        while store.xlen(stream) < 3:
            assert time.monotonic() < deadline, store.xlen(stream)
            time.sleep(0.1)
        events = [json.loads(f[b"event"])["data"] for _, f in store.xrange(stream)]
        state = client.get("/v1/payloads").json()
        store.delete(stream)
    assert [(e["request_id"], e["model"], e["version"]) for e in events] == [
        (f"serve-{i}", "linear", "1") for i in range(3)]
    for i, event in enumerate(events):
        np.testing.assert_allclose(event["outputs"]["probabilities"],
                                   reference_probabilities(x[i:i + 1], seed=1), atol=1e-5)
    assert state["logged"] >= 3 and state["stream"] == stream and state["redis"] is True
