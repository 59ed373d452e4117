"""Scaling and updating a live application without failing a request.

A second application (``keel-scale``: an Ingress and the ``linear`` test model)
runs next to the shared one, so that autoscaling and config changes do not
disturb the other tests. Its model is made slow on purpose (a long
``batch_wait_timeout_s`` with batches that never fill), so that each request
stays ongoing long enough for Serve's autoscaler to see the load.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ray import serve
from ray.serve._private.common import ReplicaState

from tests.support.modelkit import reference_probabilities
from tests.support.serve_app import KeelApp, serve_test_config, wait_running
from tests.support.steadyload import SteadyLoad, per_second, table

pytestmark = pytest.mark.slow

APP = "keel-scale"
PREFIX = "/scale"
WIDTH = 4  # the linear test model's input width

#: Small, fast knobs so the test sees a full cycle in about a minute. Serve averages each
#: handle's ongoing requests over look_back_period_s and pushes them every
#: metrics_interval_s (deprecated in favour of RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_
#: INTERVAL_S, which would apply to every application of the session; it still works).
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 3,
    # Ongoing handle calls: the ingress coalesces requests into at most calls_in_flight (4)
    # calls per model, so 4 busy calls / target 1 wants 4 replicas, capped at 3.
    "target_ongoing_requests": 1,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
}
#: A request waits this long for its batch to fill (it never does at this load).
SLOW_BATCH_WAIT_S = 0.2
HEAVY_CLIENTS = 8  # 8 requests in 4 coalesced calls / target 1 → wants 4, capped at 3


def scale_app(model_repo: Path, redis_url: str) -> dict[str, Any]:
    """The second application: Ingress, SloMonitor and an autoscaled, slow ``linear``."""
    app = serve_test_config(model_repo, None, redis_url)["applications"][0]
    app.update(name=APP, route_prefix=PREFIX)
    app["args"].update(models=["linear"], llm=False)
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("Ingress", "SloMonitor", "linear")]
    for dep in app["deployments"]:
        if dep["name"] == "Ingress":
            # Every request must reach the model: the load is what the autoscaler sees.
            dep["user_config"]["cache"] = {**dep["user_config"]["cache"], "enabled": False}
            dep["user_config"]["calls_in_flight"] = 4
        if dep["name"] == "linear":
            dep.pop("num_replicas")
            dep["autoscaling_config"] = dict(AUTOSCALING)
            dep["max_ongoing_requests"] = 16
            dep["user_config"] = {"version": "1", "max_batch_size": 16,
                                  "batch_wait_timeout_s": SLOW_BATCH_WAIT_S}
    return app


def with_app(keel_app: KeelApp, app: dict[str, Any]) -> dict[str, Any]:
    """The full config: the shared application unchanged, and ``app`` beside it."""
    config = keel_app.modified()
    config["applications"] = [*config["applications"][:1], copy.deepcopy(app)]
    return config


def apply(keel_app: KeelApp, app: dict[str, Any], timeout_s: float = 180) -> None:
    """Apply a changed second application as `serve deploy` would (one controller call)
    without touching ``keel_app.config`` (the shared application's own record)."""
    from ray.serve.schema import ServeDeploySchema

    keel_app.client.deploy_apps(ServeDeploySchema.model_validate(with_app(keel_app, app)))
    wait_running([APP], timeout_s)


@pytest.fixture(scope="module")
def scaled(keel_app: KeelApp, model_repo: Path, cache_redis: Any) -> Iterator[dict[str, Any]]:
    """The second application, deployed for this module; yields its config."""
    app = scale_app(model_repo, cache_redis.url)
    with keel_app.alongside(copy.deepcopy(app)) as url:
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v2/health/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the second application never got ready"
            time.sleep(0.5)
        yield app


def infer(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}], **extra}


def replicas(keel_app: KeelApp, deployment: str = "linear") -> dict[str, Any]:
    """Running replicas (``serve.status()``) and the autoscaler's target (serve details)."""
    status = serve.status().applications[APP].deployments[deployment]
    details = keel_app.client.get_serve_details()["applications"][APP]["deployments"]
    running = status.replica_states.get(ReplicaState.RUNNING, 0)
    return {"replicas": running,
            "target": details[deployment]["target_num_replicas"]}


def test_replicas_follow_the_load_and_no_request_fails(keel_app: KeelApp,
                                                       scaled: dict[str, Any]) -> None:
    x = np.random.default_rng(5).normal(size=(64, WIDTH)).astype(np.float32)
    route = f"{PREFIX}/v2/models/linear/infer"

    def one_row(client: httpx.Client, i: int) -> httpx.Response:
        return client.post(route, json=infer(x[i % len(x)][None, :]))

    load = SteadyLoad(keel_app.base_url)
    samples: list[dict[str, Any]] = []

    def sample() -> dict[str, Any]:
        point = {"t": round(load.now(), 2), **replicas(keel_app)}
        samples.append(point)
        return point

    def poll_until(done: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done(sample()):
                return True
            time.sleep(0.5)
        return False

    assert sample()["replicas"] == 1
    # One client throughout: requests are in flight while replicas start and while
    # they drain and stop.
    load.start("light", one_row, clients=1)
    try:
        time.sleep(2)
        heavy = load.start("heavy", one_row, clients=HEAVY_CLIENTS)
        load_started = load.now()
        reached_max = poll_until(lambda s: s["replicas"] >= AUTOSCALING["max_replicas"], 120)
        time.sleep(3)  # hold the peak, with every replica serving
        load.stop(heavy)
        load_stopped = load.now()
        back_to_min = poll_until(
            lambda s: s["replicas"] == AUTOSCALING["min_replicas"] and s["target"] == 1, 120)
        time.sleep(2)  # and keep serving on the remaining replica
    finally:
        load.stop()
    timeline = per_second(load, samples)
    print(f"\nautoscaling timeline (heavy load from t={load_started:.1f} s to "
          f"t={load_stopped:.1f} s):\n{table(timeline)}")

    failures = load.failures()
    assert not failures, failures[:3]
    peak = max(s["replicas"] for s in samples if load_started <= s["t"] <= load_stopped + 1)
    assert peak > 1, table(timeline)
    assert reached_max, f"never reached {AUTOSCALING['max_replicas']} replicas:\n" \
                        f"{table(timeline)}"
    assert back_to_min, f"never scaled back to {AUTOSCALING['min_replicas']}:\n{table(timeline)}"
    # Requests were served all along, including while replicas were added and removed.
    up = [s["t"] for s in samples if s["replicas"] > 1]
    assert load.between(up[0] - 1, up[0] + 1) and load.between(up[-1] - 1, up[-1] + 2)
    # Every answer is the model's answer.
    for answer in load.answers:
        assert answer.body["model_version"] == "1"


def test_one_config_changes_a_version_and_live_knobs_with_no_failed_request(
        keel_app: KeelApp, scaled: dict[str, Any]) -> None:
    x = np.random.default_rng(9).normal(size=(32, WIDTH)).astype(np.float32)
    expected = {v: reference_probabilities(x, seed=int(v)) for v in ("1", "2")}
    base = f"{PREFIX}/v2/models/linear"

    # Before: two fixed replicas of the model (the version change rolls over both), fast.
    before = copy.deepcopy(scaled)
    model = next(d for d in before["deployments"] if d["name"] == "linear")
    model.pop("autoscaling_config")
    model["num_replicas"] = 2
    model["user_config"] = {"version": "1", "max_batch_size": 16,
                            "batch_wait_timeout_s": 0.005}
    ingress = next(d for d in before["deployments"] if d["name"] == "Ingress")
    ingress["user_config"]["cache"] = {**ingress["user_config"]["cache"], "enabled": True}
    apply(keel_app, before)

    # After, in ONE config: a new model version and batch size, and new ingress knobs.
    after = copy.deepcopy(before)
    new_model = next(d for d in after["deployments"] if d["name"] == "linear")
    new_model["user_config"] = {**new_model["user_config"], "version": "2",
                                "max_batch_size": 8}
    new_ingress = next(d for d in after["deployments"] if d["name"] == "Ingress")
    new_ingress["user_config"]["max_entities"] = 3
    new_ingress["user_config"]["cache"] = {**new_ingress["user_config"]["cache"],
                                           "ttl_s": 42}

    too_many = {"model": "linear", "entities": [{"symbol": f"S{i}"} for i in range(4)]}
    assert httpx.post(f"{keel_app.base_url}{PREFIX}/v1/decide", json=too_many,
                      timeout=30).status_code == 503  # no feature store: not a limit yet

    def infer_row(client: httpx.Client, i: int) -> httpx.Response:
        row = i % len(x)  # the request id carries the row back with the answer
        return client.post(f"{base}/infer", json=infer(x[row][None, :], id=str(row)))

    def read_state(client: httpx.Client, i: int) -> httpx.Response:
        # The model's metadata (its served version) and the cache's live settings in turn.
        return client.get(base if i % 2 else f"{PREFIX}/v1/cache")

    load = SteadyLoad(keel_app.base_url)
    load.start("infer", infer_row, clients=4)
    load.start("state", read_state, clients=1)
    try:
        time.sleep(2)
        applied_at = load.now()
        apply(keel_app, after)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                a.body["model_version"] == "2" for a in load.answers[-8:]
                if a.route == "infer" and a.ok):
            time.sleep(0.2)
        time.sleep(2)
        load.stop()
        check_update(load, applied_at, expected, too_many, keel_app.base_url)
    finally:
        load.stop()
        apply(keel_app, scaled)  # the module's application as it was


def check_update(load: SteadyLoad, applied_at: float, expected: dict[str, np.ndarray],
                 too_many: dict[str, Any], base_url: str) -> None:
    """No request failed; the answers switched versions; every new knob is in force."""
    failures = load.failures()
    assert not failures, failures[:3]
    answers = load.between(0, float("inf"), "infer")
    assert answers[0].body["model_version"] == "1" and answers[-1].body["model_version"] == "2"
    assert load.between(0, applied_at, "state") and load.between(applied_at, 1e9, "state")
    # Each answer is exactly what the version it names computes for its row.
    for answer in answers:
        out = next(o for o in answer.body["outputs"] if o["name"] == "probabilities")
        np.testing.assert_allclose(
            out["data"], expected[answer.body["model_version"]][int(answer.body["id"])],
            atol=1e-5)
    states = [a.body for a in load.between(0, float("inf"), "state")]
    served = [s["parameters"]["served_version"] for s in states if "parameters" in s]
    assert served[0] == "1" and served[-1] == "2"
    ttls = [s["config"]["ttl_s"] for s in states if "config" in s]
    assert ttls[0] == 600 and ttls[-1] == 42

    # The new live knobs are in force: the ingress limit, and the model's batch size.
    limited = httpx.post(f"{base_url}{PREFIX}/v1/decide", json=too_many, timeout=30)
    assert limited.status_code == 400 and "at most 3 entities" in limited.text
    handle = serve.get_deployment_handle("linear", app_name=APP)
    for _ in range(4):  # both replicas (the router spreads calls)
        stats = handle.stats.remote().result(timeout_s=30)
        assert stats["config"]["max_batch_size"] == 8 and stats["config"]["version"] == "2"
