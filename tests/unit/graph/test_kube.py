"""`keel render-k8s`: the manifests in cluster/ against KubeRay's CRD, Ray's schema and
Keel's checks, and the committed files against a fresh render (no cluster, no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from graph import kube
from graph.cli import main
from graph.config_check import check_serve_config

ROOT = Path(__file__).resolve().parents[3]
CRD = ROOT.parent / "shared" / "schemas" / "kuberay" / "ray.io_rayservices.yaml"


@pytest.fixture(scope="module")
def crd() -> Path:
    if not CRD.is_file():
        pytest.fail(f"the KubeRay RayService CRD is missing: expected {CRD} "
                    "(../shared/schemas/kuberay/ beside the checkout)")
    return CRD


@pytest.fixture(scope="module")
def rendered(crd: Path) -> dict[str, str]:
    return kube.render(ROOT, crd)


@pytest.fixture(scope="module")
def service(rendered: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(rendered[f"{kube.OUT_DIR}/rayservice.yaml"])
    return doc


def test_committed_manifests_equal_a_fresh_render(rendered: dict[str, str]) -> None:
    stale = kube.stale(ROOT, rendered)
    assert stale == [], (f"{stale} differ from `keel render-k8s`: edit serve_config.yaml or "
                         f"{kube.OVERLAY} and render again, never the manifests")


def test_check_mode(crd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render-k8s", "--root", str(ROOT), "--crd", str(crd), "--check"]) == 0
    root = _copy_inputs(tmp_path)
    assert main(["render-k8s", "--root", str(root), "--crd", str(crd)]) == 0
    assert main(["render-k8s", "--root", str(root), "--crd", str(crd), "--check"]) == 0
    target = root / kube.OUT_DIR / "redis.yaml"
    target.write_text(target.read_text() + "# edited by hand\n")
    capsys.readouterr()
    assert main(["render-k8s", "--root", str(root), "--crd", str(crd), "--check"]) == 1
    assert "redis.yaml" in capsys.readouterr().err


def test_rayservice_passes_the_crd_schema(crd: Path, service: dict[str, Any]) -> None:
    schema = kube.load_crd_schema(crd)
    assert kube.crd_errors(service, schema) == []
    # Strict: a misspelt field is refused, not pruned as the API server would do silently.
    typo = yaml.safe_load(yaml.safe_dump(service))
    typo["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    typo["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    errors = kube.crd_errors(typo, schema)
    assert any("enableInTreeAutoscalling" in e for e in errors), errors
    assert any("rayStartParams.num-cpus" in e for e in errors), errors


def test_rayservice_shape(service: dict[str, Any]) -> None:
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["enableInTreeAutoscaling"] is True
    gcs = cluster["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"] == "keel-redis:6379"
    assert gcs["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "keel-redis",
                                                                 "key": "password"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    [workers] = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["maxReplicas"]
    version = kube.package_version(ROOT)
    for spec in (cluster["headGroupSpec"], workers):
        [container] = spec["template"]["spec"]["containers"]
        assert container["image"] == f"keel:{version}"
        assert container["resources"]["requests"] == container["resources"]["limits"]
        env = {e["name"]: e for e in container["env"]}
        assert env["KEEL_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "keel-redis"
        assert env["KEEL_FEATURE_STORE_YAML"]["value"] == "feature_store.production.yaml"
        assert {"KEEL_REDIS_URL", "KEEL_FEAST_REDIS", "KEEL_FEAST_PG_PASSWORD"} <= set(env)
        assert all("value" not in env[n] for n in env if "PASSWORD" in n)
        # gRPC: the pods and the serve Service carry its port.
        assert {"containerPort": 9000, "name": "grpc"} in container["ports"]
    ports = service["spec"]["serveService"]["spec"]["ports"]
    assert [(p["name"], p["port"]) for p in ports] == [("serve", 8000), ("grpc", 9000)]


def test_serve_config_v2_is_valid(service: dict[str, Any], tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    text = service["spec"]["serveConfigV2"]
    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)
    path = tmp_path / "serve_config.yaml"
    path.write_text(text)
    assert check_serve_config(path) == []
    # The overlay reached it, and everything else is serve_config.yaml's.
    app = config["applications"][0]
    deps = {d["name"]: d for d in app["deployments"]}
    assert app["args"]["feature_store_yaml"] == "feature_store.production.yaml"
    assert deps["Ingress"]["autoscaling_config"]["min_replicas"] == 2
    assert "num_replicas" not in deps["Ingress"]
    source = yaml.safe_load((ROOT / kube.SERVE_CONFIG).read_text())
    source_deps = {d["name"]: d for d in source["applications"][0]["deployments"]}
    assert deps["SloMonitor"] == source_deps["SloMonitor"]
    assert deps["risk_gbdt"]["user_config"] == source_deps["risk_gbdt"]["user_config"]


def test_every_other_manifest_is_well_formed(rendered: dict[str, str]) -> None:
    needs_spec = {"Service", "StatefulSet", "CronJob", "PodMonitor"}
    kinds = set()
    for name, text in rendered.items():
        if not name.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name
            kinds.add(doc["kind"])
            if doc["kind"] in needs_spec:
                assert isinstance(doc["spec"], dict), name
    assert {"RayService", "Service", "StatefulSet", "CronJob", "PodMonitor",
            "Secret"} <= kinds
    assert rendered[kube.DOCKERFILE].count(f"FROM {kube.RAY_IMAGE}") == 1


def _copy_inputs(tmp_path: Path, mutate: Any = None) -> Path:
    """A scratch root with serve_config.yaml, the overlay and what render reads."""
    root = tmp_path / "repo"
    for name in (kube.SERVE_CONFIG, kube.OVERLAY, kube.PODMONITOR_SOURCE, "pyproject.toml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text((ROOT / name).read_text())
    if mutate is not None:
        config = yaml.safe_load((root / kube.SERVE_CONFIG).read_text())
        mutate(config)
        (root / kube.SERVE_CONFIG).write_text(yaml.safe_dump(config))
    return root


def test_invalid_serve_config_is_refused_and_nothing_written(
        crd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def bad(config: dict[str, Any]) -> None:
        dep = next(d for d in config["applications"][0]["deployments"] if d["name"] == "risk_gbdt")
        dep["user_config"]["max_batch_size"] = "lots"

    root = _copy_inputs(tmp_path, bad)
    with pytest.raises(kube.RenderError, match=r"risk_gbdt\)\.user_config\.max_batch_size"):
        kube.render(root, crd)
    assert main(["render-k8s", "--root", str(root), "--crd", str(crd)]) == 2
    assert "user_config.max_batch_size" in capsys.readouterr().err
    assert not (root / "cluster").exists()


def test_overlay_mistakes_are_named(crd: Path, tmp_path: Path) -> None:
    root = _copy_inputs(tmp_path)
    overlay = root / kube.OVERLAY
    text = overlay.read_text()
    overlay.write_text(text.replace("      risk_gbdt:", "      risk_gbtd:"))
    with pytest.raises(kube.RenderError, match=r"deployments\.risk_gbtd: no deployment"):
        kube.render(root, crd)
    overlay.write_text(text.replace("  idle_timeout_s: 60", "  idle_timeout: 60"))
    with pytest.raises(kube.RenderError, match=r"cluster\.idle_timeout: Extra inputs"):
        kube.render(root, crd)
    # The merged config is checked too: the overlay cannot break a Keel rule.
    overlay.write_text(text.replace("      risk_gbdt:\n",
                                    "      risk_gbdt:\n        max_ongoing_requests: 4\n"))
    with pytest.raises(kube.RenderError, match=r"risk_gbdt\)"):
        kube.render(root, crd)
    assert not (root / "cluster").exists()


def test_a_missing_crd_is_refused(tmp_path: Path) -> None:
    with pytest.raises(kube.RenderError, match="--crd"):
        kube.render(_copy_inputs(tmp_path), tmp_path / "nope.yaml")


def test_merge_rules() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert kube.merge(base, {"a": {"c": [3], "e": 2}, "d": None}) == {"a": {"b": 1, "c": [3],
                                                                            "e": 2}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}
