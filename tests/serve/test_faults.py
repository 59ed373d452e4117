"""Faults injected under a steady client load, on a second application.

Every test keeps a few client threads posting to the application the whole time
(``/v2/models/<m>/infer`` and/or ``/v1/decide``), counts accepted (2xx) and
failed answers, injects one real fault, waits for the application to recover and
records its figures (see ``record_fault``). The faults are destructive, so they
hit ``keel-faults``, a second application next to the shared one with its own
model repository and its own copy of the feature repository; the shared one is
never touched.

The ``linear`` model runs two replicas here: a killed, hung or failed-to-reconfigure
replica then leaves one that keeps answering while Serve replaces it (or stops the
rollout). With one replica there is nothing to answer in between: Serve stops a replica
whose reconfigure() raised, so a one-replica model would be down until a good deploy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray
from ray import serve

from deployments.stall.core import STALL_AFTER_S
from tests.support.decisions import entities
from tests.support.modelkit import write_linear_model
from tests.support.serve_app import KeelApp, serve_test_config
from tests.support.steadyload import Request, SteadyLoad

pytestmark = pytest.mark.slow

APP = "keel-faults"
PREFIX = "/faults"
MODEL = "linear"
#: Serve names a replica's actor ``SERVE_REPLICA::<app>#<deployment>#<id>`` (ReplicaID).
REPLICA_PREFIX = f"SERVE_REPLICA::{APP}#{MODEL}#"
#: Health checks at test speed; the timeout leaves room for a busy 2-core machine.
HEALTH_CHECK = {"health_check_period_s": 1.0, "health_check_timeout_s": 3.0,
                # Serve stops a replica that failed its health checks gracefully, and a hung
                # one never finishes that: this bounds the wait (20 s by default) before it is
                # killed. A model request takes milliseconds, so 2 s loses nothing.
                "graceful_shutdown_timeout_s": 2.0}


#: Client threads during the hang: enough that Serve's router, left alone, keeps sending
#: calls to the hung replica (each one refreshes its queue length there).
CLIENTS_DURING_HANG = 8


def record_fault(fault: str, accepted: int, failed: int, recovery_s: float | None,
                 **details: Any) -> None:
    """Append one JSON line with a fault's figures to ``$KEEL_FAULT_REPORT`` (if set)."""
    target = os.environ.get("KEEL_FAULT_REPORT")
    if not target:
        return
    line = {"fault": fault, "accepted": accepted, "failed": failed,
            "recovery_s": None if recovery_s is None else round(recovery_s, 2), **details}
    with open(target, "a", encoding="utf-8") as out:
        out.write(json.dumps(line, sort_keys=False) + "\n")


# -- load -----------------------------------------------------------------------------------


def steady(url: str, requests: dict[str, Request], clients: int) -> SteadyLoad:
    """``clients`` client threads per route, posting until the ``with`` block ends."""
    load = SteadyLoad(url)
    for route, request in requests.items():
        load.start(route, request, clients)
    return load


def infer_request(client: httpx.Client, i: int) -> httpx.Response:
    # Different rows every time: the application's cache is off anyway, but no answer
    # could come from anywhere but a model replica.
    x = np.random.default_rng(i).normal(size=(1, 4)).astype(np.float32)
    return client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
        {"name": "features", "shape": [1, 4], "datatype": "FP32",
         "data": x.reshape(-1).tolist()}]})


def decide_request(client: httpx.Client, i: int) -> httpx.Response:
    return client.post("/v1/decide", json={"model": "risk_mlp",
                                           "entities": entities(1, offset=i % 97)})


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds. Generous timeouts only."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, (
            f"timed out after {timeout_s} s waiting for {what}: {getattr(condition, 'last', '')}")
        time.sleep(0.2)


# -- the second application and its replicas --------------------------------------------------


@dataclass(frozen=True)
class FaultsApp:
    url: str
    config: dict[str, Any]
    model_repo: Path
    feature_repo: Path


@pytest.fixture(scope="module")
def faults_app(keel_app: KeelApp, model_repo: Path, feature_repo: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultsApp]:
    """``keel-faults``: linear (2 replicas, fast health checks) and risk_mlp over private
    copies of the model and feature repositories; the prediction cache is off so every
    request reaches the model."""
    models = tmp_path_factory.mktemp("faults-models")
    shutil.copytree(model_repo / "risk_mlp", models / "risk_mlp")
    write_linear_model(models, MODEL, "1", n_features=4, seed=1)
    # The prepared store (registry and SQLite online DB under data/) with relative paths.
    features = tmp_path_factory.mktemp("faults-feast") / "repo"
    shutil.copytree(feature_repo, features, ignore=shutil.ignore_patterns("__pycache__"))

    app = serve_test_config(models, features)["applications"][0]
    app.update(name=APP, route_prefix=PREFIX)
    app["args"].update(models=["risk_mlp", MODEL], llm=False)
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("Ingress", "FeatureService", "SloMonitor",
                                           "risk_mlp", MODEL)]
    for dep in app["deployments"]:
        if dep["name"] == "Ingress":
            dep["user_config"]["cache"]["enabled"] = False
        if dep["name"] == MODEL:
            dep.update(num_replicas=2, **HEALTH_CHECK)
    with keel_app.alongside(app) as url:
        yield FaultsApp(url, keel_app.config, models, features)


def replicas() -> set[str]:
    """The actor names of the model's live replicas in the faults application."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(REPLICA_PREFIX)}


def replica_pid(name: str) -> int:
    actor = ray.get_actor(name, namespace="serve")
    pid: Any = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
    return int(pid)


def model_status() -> tuple[str, str]:
    """The model deployment's Serve status and message."""
    app = serve.status().applications[APP]
    dep = app.deployments[MODEL]
    return str(getattr(dep.status, "value", dep.status)), dep.message


def healthy_with(names_changed_from: set[str]) -> Callable[[], bool]:
    """Two live replicas, none of them in ``names_changed_from``'s dead ones, HEALTHY."""
    def check() -> bool:
        live = replicas()
        ok = (len(live) == 2 and live != names_changed_from
              and model_status()[0] == "HEALTHY")
        if not ok:
            check.last = (  # type: ignore[attr-defined]
                f"replicas {sorted(live)}, status {model_status()}")
        return ok
    return check


# -- a. a model replica is killed ------------------------------------------------------------


def test_a_killed_model_replica_is_replaced_and_requests_recover(faults_app: FaultsApp) -> None:
    before = replicas()
    assert len(before) == 2, before
    victim = sorted(before)[0]
    with steady(faults_app.url, {"infer": infer_request}, 3) as load:
        load.wait_accepted(30)
        killed_at = load.now()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        wait_until(healthy_with(before), 120, "a replacement replica")
        back_at = load.now()
        load.wait_accepted(30)
    figures = load.summary()
    failures = load.failures()
    record_fault("model replica killed (ray.kill, 1 of 2)", figures["accepted"],
                 figures["failed"], back_at - killed_at,
                 failed_statuses=figures["failed_statuses"])
    assert victim not in replicas()
    # Only requests already inside the killed replica may fail, and only as a 503 with
    # Retry-After that a retrying client recovers from; everything sent after it went to
    # the surviving replica.
    assert all(a.status == 503 and a.retry_after for a in failures), failures
    assert len(failures) <= 3 * 2, failures  # at most what the 3 clients had in flight


# -- e. a replica that fails its health checks ------------------------------------------------


def test_a_hung_replica_is_routed_around_then_fails_its_health_checks_and_is_replaced(
        faults_app: FaultsApp) -> None:
    before = replicas()
    assert len(before) == 2, before
    victim = sorted(before)[0]
    pid = replica_pid(victim)
    with steady(faults_app.url, {"infer": infer_request}, CLIENTS_DURING_HANG) as load:
        load.wait_accepted(30)
        stopped_at = load.now()
        os.kill(pid, signal.SIGSTOP)  # hung: alive, but answers nothing, health checks too
        try:
            wait_until(healthy_with(before), 120,
                       "Serve to replace the replica failing its health checks")
            back_at = load.now()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # Serve killed it; if not, never leave it hung
        load.wait_accepted(30)
    figures = load.summary()
    failures = load.failures()
    record_fault("replica hung (SIGSTOP) -> health checks fail", figures["accepted"],
                 figures["failed"], back_at - stopped_at,
                 failed_statuses=figures["failed_statuses"])
    assert victim not in replicas()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # Serve killed the hung process
    assert all(a.status == 503 and a.retry_after for a in failures), failures
    assert len(failures) <= CLIENTS_DURING_HANG * 2, failures
    # The callers stop sending to the hung replica once a call to it has gone unanswered
    # for STALL_AFTER_S (deployments/stall): a request sent after that never waits for the
    # ingress's hedged second attempt (model_call_retry_s, 5 s), though Serve's health
    # checks take several more seconds to give up on the replica.
    routed_around = [a for a in load.answers
                     if stopped_at + 3 * STALL_AFTER_S <= a.sent < back_at - 1]
    assert len(routed_around) >= 20, len(routed_around)
    waited = [(round(a.sent - stopped_at, 2), round(a.took_s, 2)) for a in routed_around
              if not a.ok or a.took_s >= 2.5]
    assert not waited, f"sent (s after SIGSTOP), took s: {waited}"



# -- d. the embedded feature store's online DB becomes unreadable ---------------------------


def test_an_unreadable_online_store_is_503_for_decide_and_tensors_still_work(
        faults_app: FaultsApp) -> None:
    # Feast's SQLite store keeps one connection open, so chmod or moving the file away
    # changes nothing for a running replica. What does reach it is the file going bad under
    # the open connection: SQLite re-reads the header at each read, finds no database.
    db = faults_app.feature_repo / "data" / "online.db"
    with db.open("rb") as original:
        header = original.read(100)
    requests: dict[str, Request] = {"decide": decide_request, "infer": infer_request}
    with steady(faults_app.url, requests, 2) as load:
        load.wait_accepted(10, "decide")
        load.wait_accepted(10, "infer")
        broken_at = load.now()
        with db.open("r+b") as target:
            target.write(b"this is not a SQLite database".ljust(100, b"\0"))
        try:
            wait_until(lambda: load.failures("decide", since=broken_at) != [], 60,
                       "/v1/decide to fail on the unreadable store")
            load.wait_accepted(20, "infer")  # tensors keep being answered meanwhile
        finally:
            with db.open("r+b") as target:
                target.write(header)
        restored_at = load.now()
        wait_until(lambda: load.accepted("decide", since=restored_at) > 0, 60,
                   "/v1/decide to recover once the store is readable")
        back_at = load.now()
        load.wait_accepted(10, "decide")
    decide, infer = load.summary("decide"), load.summary("infer")
    record_fault("feature store unreadable (SQLite online DB corrupted, then restored)",
                 decide["accepted"] + infer["accepted"], decide["failed"] + infer["failed"],
                 back_at - restored_at, failed_statuses=decide["failed_statuses"],
                 decide=decide, infer=infer,
                 note="failed = /v1/decide while the store was unreadable; /v2 unaffected")
    assert infer["failed"] == 0, load.failures("infer")
    failures = load.failures("decide")
    assert failures, "the corrupted store never failed a lookup"
    assert all(a.status == 503 and "feature store" in a.error for a in failures), failures
    # Nothing failed outside the window in which the file was unreadable.
    assert all(broken_at <= a.t <= back_at for a in failures), failures


# -- b. a new version whose model file is garbage -------------------------------------------


def _linear(config: dict[str, Any]) -> dict[str, Any]:
    app = next(a for a in config["applications"] if a["name"] == APP)
    dep: dict[str, Any] = next(d for d in app["deployments"] if d["name"] == MODEL)
    return dep


def _app_status() -> str:
    status = serve.status().applications[APP].status
    return str(getattr(status, "value", status))


def test_a_corrupt_model_file_fails_the_rollout_and_the_old_version_keeps_serving(
        keel_app: KeelApp, faults_app: FaultsApp) -> None:
    write_linear_model(faults_app.model_repo, MODEL, "2", n_features=4, seed=7)
    broken = faults_app.model_repo / MODEL / "2" / "model.onnx"
    broken.write_bytes(b"not an ONNX model\n" * 16)
    good = keel_app.modified()

    def new_replicas(config: dict[str, Any]) -> None:
        # A changed ray_actor_options makes Serve start new replicas: their constructor
        # loads the pinned version.
        dep = _linear(config)
        dep["user_config"]["version"] = "2"
        dep["ray_actor_options"] = {"num_cpus": 0, "runtime_env": {
            "env_vars": {"KEEL_ROLLOUT": "2"}}}

    def in_place(config: dict[str, Any]) -> None:
        # Only user_config changes: Serve calls reconfigure() on the running replicas.
        _linear(config)["user_config"]["version"] = "2"

    with steady(faults_app.url, {"infer": infer_request}, 3) as load:
        load.wait_accepted(20)
        for path, change in (("new replicas", new_replicas), ("in-place reconfigure", in_place)):
            config = keel_app.modified()
            change(config)
            started = load.now()
            keel_app.deploy(config, wait=False)
            wait_until(lambda: _app_status() == "DEPLOY_FAILED", 180,
                       f"the {path} rollout of a corrupt model file to fail")
            status, message = model_status()
            load.wait_accepted(20)  # still served, by the previous version
            # Roll back: the previous config comes up again, the broken file still there.
            rolled_back = load.now()
            keel_app.deploy(good, wait=False)
            wait_until(lambda: _app_status() == "RUNNING"
                       and model_status()[0] == "HEALTHY", 180,
                       f"the rollback after the {path} rollout")
            back_at = load.now()
            load.wait_accepted(20)
            figures = load.summary(since=started, until=back_at)
            record_fault(f"corrupt model.onnx rolled out ({path})", figures["accepted"],
                         figures["failed"], back_at - rolled_back,
                         failed_statuses=figures["failed_statuses"],
                         note="recovery = rollback deploy until RUNNING")
            assert status == "DEPLOY_FAILED", (status, message)
            assert str(broken) in message and "'linear'" in message, message
            assert figures["failed"] == 0, (path, load.failures(since=started)[:5])
    versions = Counter(a.version for a in load.answers if a.ok)
    assert set(versions) == {"1"}, versions
