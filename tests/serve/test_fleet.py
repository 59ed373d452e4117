"""A multiplexed fleet on the real application: twelve per-tenant models (``keel
prepare``'s fleet builder) sharing one ``FleetModel`` deployment of two replicas that
hold at most three models each. What a replica loaded, unloaded and answered comes from
its own ledger (``stats()``), never from the client's side.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from ray import serve

from tests.support.decisions import entities
from tests.support.serve_app import KeelApp, serve_test_config

pytestmark = pytest.mark.slow

APP = "keel-fleet"
PREFIX = "/fleet"
FLEET = "Tenants"
SIZE = 12
PER_REPLICA = 3


@dataclass(frozen=True)
class FleetApp:
    url: str
    directory: Path


def tenant(i: int) -> str:
    from graph.demo.build import tenant_name

    return tenant_name(i)


@pytest.fixture(scope="module")
def fleet_app(keel_app: KeelApp, feature_repo: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetApp]:
    from graph.demo.build import FLEET_DIRECTORY, build_fleet
    from graph.demo.dataset import DatasetConfig

    models = tmp_path_factory.mktemp("fleet-models")
    build_fleet(models, config=DatasetConfig(n_train_rows=4000), size=SIZE)
    features = tmp_path_factory.mktemp("fleet-feast") / "repo"
    shutil.copytree(feature_repo, features, ignore=shutil.ignore_patterns("__pycache__"))
    app = serve_test_config(models, features)["applications"][0]
    app.update(name=APP, route_prefix=PREFIX)
    app["args"].update(llm=False, fleets={
        FLEET: {"directory": FLEET_DIRECTORY, "max_models_per_replica": PER_REPLICA}})
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("Ingress", "FeatureService", "SloMonitor")]
    for dep in app["deployments"]:
        if dep["name"] == "Ingress":
            dep["user_config"]["cache"]["enabled"] = False  # every row reaches its model
    app["deployments"].append({"name": FLEET, "num_replicas": 2, "max_ongoing_requests": 64,
                               "ray_actor_options": {"num_cpus": 0},
                               "user_config": {"runtime": {"intra_op_num_threads": 1}}})
    with keel_app.alongside(app) as url:
        yield FleetApp(url, models / FLEET_DIRECTORY)


@pytest.fixture
def client(fleet_app: FleetApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet_app.url, timeout=30) as http:
        yield http


ROWS = np.random.default_rng(5).normal(size=(64, 12)).astype(np.float32)


def reference(directory: Path, name: str, version: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(directory / name / version / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probabilities"], {"features": x})[0])


def infer(http: httpx.Client, name: str, row: int,
          version: str | None = None) -> httpx.Response:
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    return http.post(path, json={"inputs": [
        {"name": "features", "shape": [1, 12], "datatype": "FP32",
         "data": ROWS[row].tolist()}]})


def probabilities(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    output = next(o for o in response.json()["outputs"] if o["name"] == "probabilities")
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def replica_ledgers() -> dict[str, dict[str, Any]]:
    """Each fleet replica's own ledger, by replica id (asked until both have answered)."""
    handle = serve.get_deployment_handle(FLEET, app_name=APP)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(60):
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only {len(seen)} fleet replica answered stats()")


def totals(ledgers: dict[str, dict[str, Any]], field: str) -> Counter[str]:
    total: Counter[str] = Counter()
    for ledger in ledgers.values():
        total.update(ledger[field])
    return total


def check_ledger_invariants(ledgers: dict[str, dict[str, Any]]) -> None:
    for replica, ledger in ledgers.items():
        loaded = ledger["loaded"]
        assert len(loaded) <= PER_REPLICA, (replica, loaded)
        assert sum(ledger["loads"].values()) - sum(ledger["unloads"].values()) == len(loaded)
        assert not ledger["failed_loads"], ledger


def test_every_tenant_answers_with_its_own_model_over_infer_and_decide(
        client: httpx.Client, fleet_app: FleetApp) -> None:
    for i in range(SIZE):
        name = tenant(i)
        response = infer(client, name, i)
        assert response.json()["model_version"] == "1"
        np.testing.assert_allclose(probabilities(response),
                                   reference(fleet_app.directory, name, "1", ROWS[i:i + 1]),
                                   rtol=1e-5, atol=1e-6)
    # /v1/decide on a fleet member: the same request as for any model.
    asked = entities(4)
    decided = client.post("/v1/decide", json={"model": tenant(3), "entities": asked})
    assert decided.status_code == 200, decided.text
    body = decided.json()
    assert body["model"] == tenant(3) and body["model_version"] == "1"
    assert [r["entity"] for r in body["results"]] == asked
    metadata = client.get(f"/v2/models/{tenant(3)}")
    assert metadata.status_code == 200
    assert metadata.json()["parameters"]["placement"] == "fleet"
    assert metadata.json()["parameters"]["fleet"] == FLEET
    ready = client.get("/v2/health/ready").json()
    assert ready["fleets"] == {FLEET: {"ready": True, "models": SIZE}}, ready
    check_ledger_invariants(replica_ledgers())


def test_requests_stay_on_the_replica_that_holds_the_model(client: httpx.Client) -> None:
    """Three tenants fit in one replica (the router may put all of them on one while
    both are full): once each is loaded, 200 concurrent requests over them load nothing
    again and each tenant is answered only by the replica that holds it."""
    names = [tenant(i) for i in range(3)]
    for name in names:  # one at a time: each replica's models reach the routers first
        assert infer(client, name, 0).status_code == 200
        time.sleep(0.5)
    before = replica_ledgers()
    holders = {name: [r for r, ledger in before.items() if name in ledger["loaded"]]
               for name in names}
    assert all(len(h) == 1 for h in holders.values()), holders

    def one(i: int) -> int:
        return infer(client, names[i % 3], i % 64).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes == [200] * 200
    after = replica_ledgers()
    assert totals(after, "loads") == totals(before, "loads"), "a held model loaded again"
    for name, [holder] in holders.items():
        for replica, ledger in after.items():
            grew = ledger["calls"].get(name, 0) - before[replica]["calls"].get(name, 0)
            if replica == holder:
                assert grew > 0, (name, replica)
            else:
                assert grew == 0, f"{name} answered by {replica}, not its holder {holder}"
    check_ledger_invariants(after)


def test_a_burst_over_more_tenants_than_the_fleet_holds_fails_no_request(
        client: httpx.Client, fleet_app: FleetApp) -> None:
    """Twelve tenants, room for six: models are unloaded and loaded again under
    concurrent load, and every request is answered by its own tenant's model."""
    before = replica_ledgers()
    expected = {tenant(i): reference(fleet_app.directory, tenant(i), "1", ROWS)
                for i in range(SIZE)}

    def one(i: int) -> tuple[str, int, np.ndarray | str]:
        name, row = tenant((i * 7) % SIZE), i % 64
        response = infer(client, name, row)
        if response.status_code != 200:
            return name, row, response.text
        return name, row, probabilities(response)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(360)))
    failed = [(name, answer) for name, _, answer in answers if isinstance(answer, str)]
    assert failed == []
    for name, row, answer in answers:
        np.testing.assert_allclose(answer, expected[name][row:row + 1], rtol=1e-5, atol=1e-6)
    after = replica_ledgers()
    check_ledger_invariants(after)
    loads = sum(totals(after, "loads").values()) - sum(totals(before, "loads").values())
    unloads = sum(totals(after, "unloads").values()) - sum(totals(before, "unloads").values())
    assert loads >= SIZE - 2 * PER_REPLICA and unloads > 0, (loads, unloads)


def test_a_tenant_or_version_dropped_into_the_directory_is_served_without_a_deploy(
        client: httpx.Client, fleet_app: FleetApp) -> None:
    directory = fleet_app.directory
    # A new tenant: tenant_005's files under a new name.
    shutil.copytree(directory / tenant(5), directory / "tenant_new")
    np.testing.assert_allclose(probabilities(infer(client, "tenant_new", 9)),
                               reference(directory, tenant(5), "1", ROWS[9:10]),
                               rtol=1e-5, atol=1e-6)
    # A new version of a tenant: the member loads it within a second or so.
    assert probabilities(infer(client, tenant(1), 2)) is not None  # loaded on version 1
    staged = directory / ".staging"
    shutil.copytree(directory / tenant(2) / "1", staged)
    staged.rename(directory / tenant(1) / "2")
    deadline = time.monotonic() + 10
    while True:
        response = infer(client, tenant(1), 2)
        assert response.status_code == 200, response.text  # none fails during the swap
        if response.json()["model_version"] == "2" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert response.status_code == 200 and response.json()["model_version"] == "2", \
        response.text
    np.testing.assert_allclose(probabilities(response),
                               reference(directory, tenant(2), "1", ROWS[2:3]),
                               rtol=1e-5, atol=1e-6)
    # Pinned to the version it replaced: still loaded, still answering as itself.
    pinned = infer(client, tenant(1), 2, version="1")
    assert pinned.json()["model_version"] == "1", pinned.text
    np.testing.assert_allclose(probabilities(pinned),
                               reference(directory, tenant(1), "1", ROWS[2:3]),
                               rtol=1e-5, atol=1e-6)
    missing = infer(client, tenant(1), 2, version="7")
    assert missing.status_code == 404 and "'7'" in missing.json()["error"], missing.text


@pytest.mark.parametrize("name", ["tenant_999", "tenants", ".demo-fleet.json",
                                  "tenant_000.bak"])
def test_an_unknown_fleet_model_is_a_404_naming_it(client: httpx.Client, name: str) -> None:
    response = infer(client, name, 0)
    assert response.status_code == 404, response.text
    assert response.json()["error"].startswith("model "), response.text
    if name == "tenant_999":
        assert "'tenant_999'" in response.json()["error"]
        assert f"fleet {FLEET!r}" in response.json()["error"]
    decided = client.post("/v1/decide", json={"model": "tenant_999", "entities": entities(1)})
    assert decided.status_code == 404 and "'tenant_999'" in decided.json()["error"]


def test_a_bad_body_for_a_fleet_model_names_the_field(client: httpx.Client) -> None:
    response = client.post(f"/v2/models/{tenant(0)}/infer", json={"inputs": [
        {"name": "features", "shape": [1, 11], "datatype": "FP32", "data": [0.0] * 11}]})
    assert response.status_code == 400, response.text
    assert "features" in response.json()["error"]


def test_a_fleet_member_answers_over_grpc(keel_app: KeelApp, fleet_app: FleetApp) -> None:
    """ModelInfer on a member (Serve's gRPC port, the fleet's application named in the
    call's metadata): its own tenant's answer; an unknown member is NOT_FOUND naming it."""
    import grpc

    from deployments.ingress.grpc import protocol as pb
    from tests.support.modelkit import raw_infer_request

    metadata = (("application", APP),)
    with grpc.insecure_channel(keel_app.grpc_target) as channel:
        stub = pb.InferenceStub(channel)
        answer = stub.ModelInfer(raw_infer_request(tenant(4), ROWS[4:5]), timeout=30,
                                 metadata=metadata)
        assert (answer.model_name, answer.model_version) == (tenant(4), "1")
        names = [o.name for o in answer.outputs]
        raw = answer.raw_output_contents[names.index("probabilities")]
        np.testing.assert_allclose(np.frombuffer(raw, dtype="<f4").reshape(1, 2),
                                   reference(fleet_app.directory, tenant(4), "1", ROWS[4:5]),
                                   rtol=1e-5, atol=1e-6)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(raw_infer_request("tenant_999", ROWS[4:5]), timeout=30,
                            metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'tenant_999'" in (raised.value.details() or "")
