"""`keel render-k8s`: the manifests in cluster/ against KubeRay's CRD, Ray's schema and
Keel's checks, and the committed files against a fresh render (no cluster, no Ray)."""

from __future__ import annotations

import configparser
import threading
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
        # The offline store's PostgreSQL is reached through PgBouncer's Service.
        assert env["KEEL_FEAST_PG_HOST"] == {"name": "KEEL_FEAST_PG_HOST",
                                             "value": "keel-pgbouncer"}
        assert env["KEEL_FEAST_PG_PORT"]["value"] == "6432"
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
    needs_spec = {"Service", "StatefulSet", "Deployment", "CronJob", "PodMonitor"}
    kinds = set()
    for name, text in rendered.items():
        if not name.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name
            kinds.add(doc["kind"])
            if doc["kind"] in needs_spec:
                assert isinstance(doc["spec"], dict), name
    assert {"RayService", "Service", "StatefulSet", "Deployment", "ConfigMap", "CronJob",
            "PodMonitor", "Secret"} <= kinds
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


# --- PgBouncer ---------------------------------------------------------------------------


def _docs(rendered: dict[str, str], name: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(rendered[f"{kube.OUT_DIR}/{name}"])}


def _ini(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_pgbouncer_manifests_fit_together(rendered: dict[str, str]) -> None:
    docs = _docs(rendered, "pgbouncer.yaml")
    assert set(docs) == {"ConfigMap", "Service", "Deployment"}
    config_map, service, deployment = docs["ConfigMap"], docs["Service"], docs["Deployment"]
    ini = _ini(config_map["data"]["pgbouncer.ini"])
    settings = ini["pgbouncer"]
    # The pool mode psycopg 3 needs, and Feast's startup `options` accepted.
    assert settings["pool_mode"] == "session"
    assert "options" in settings["ignore_startup_parameters"].split(",")
    assert ini["databases"]["*"] == "host=postgres port=5432"
    port = int(settings["listen_port"])
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "edoburu/pgbouncer:v1.24.1-p1"
    assert container["ports"] == [{"name": "pgbouncer", "containerPort": port}]
    assert service["spec"]["ports"][0]["targetPort"] == port
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == labels == deployment["spec"]["selector"]["matchLabels"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[settings["auth_file"]]["name"] == "userlist"
    assert "/etc/pgbouncer/pgbouncer.ini" in mounts
    # The pods and the materialisation job connect to that Service and port.
    job = yaml.safe_load(rendered[f"{kube.OUT_DIR}/feast-materialize-cronjob.yaml"])
    [job_container] = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in job_container["env"]}
    assert (env["KEEL_FEAST_PG_HOST"], env["KEEL_FEAST_PG_PORT"]) == (
        service["metadata"]["name"], str(service["spec"]["ports"][0]["port"]))
    # The example Secrets: PgBouncer's userlist logs in the Feast user; the Feast Secret no
    # longer carries an address the manifests do not read.
    secrets = {d["metadata"]["name"]: d for d in
               yaml.safe_load_all(rendered[f"{kube.OUT_DIR}/secrets.example.yaml"])}
    feast = secrets["keel-feast"]["stringData"]
    assert "KEEL_FEAST_PG_HOST" not in feast and "KEEL_FEAST_PG_PORT" not in feast
    userlist = secrets[volumes["userlist"]["secret"]["secretName"]]["stringData"]["userlist.txt"]
    users = {line.split('"')[1] for line in userlist.splitlines()}
    assert {feast["KEEL_FEAST_PG_USER"], settings["stats_users"]} <= users


def test_pgbouncer_overlay_choices(crd: Path, tmp_path: Path) -> None:
    root = _copy_inputs(tmp_path)
    overlay = root / kube.OVERLAY
    text = overlay.read_text()
    assert "  pgbouncer:\n    enabled: true\n" in text
    overlay.write_text(text.replace("    enabled: true\n", "    enabled: true\n"
                                    "    pool_mode: transaction\n", 1))
    with pytest.raises(kube.RenderError, match=r"cluster\.pgbouncer\.pool_mode: .*psycopg 3"):
        kube.render(root, crd)
    overlay.write_text(text.replace("    upstream: postgres:5432", "    upstream: postgres"))
    with pytest.raises(kube.RenderError, match=r"cluster\.pgbouncer\.upstream"):
        kube.render(root, crd)
    # Off: no PgBouncer manifest, PostgreSQL's address from the Feast Secret again.
    overlay.write_text(text.replace("    enabled: true\n", "    enabled: false\n", 1))
    files = kube.render(root, crd)
    assert f"{kube.OUT_DIR}/pgbouncer.yaml" not in files
    service = yaml.safe_load(files[f"{kube.OUT_DIR}/rayservice.yaml"])
    [container] = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KEEL_FEAST_PG_HOST"]["valueFrom"]["secretKeyRef"]["name"] == "keel-feast"


def _hammer(bouncer: Any, clients: int = 4, statements: int = 30) -> list[str]:
    """Concurrent psycopg 3 clients, each repeating one statement past its prepare
    threshold and sending Feast's ``options`` startup parameter; their errors."""
    errors: list[str] = []

    def client() -> None:
        try:
            with bouncer.connect(autocommit=True, options="-c search_path=public") as conn:
                for i in range(statements):
                    assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
        except Exception as exc:  # collected and asserted on
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_rendered_pgbouncer_settings_carry_psycopg3(rendered: dict[str, str]) -> None:
    """The ConfigMap's pool settings on a real PgBouncer (Debian's; only the addresses,
    authentication and upstream TLS are local): psycopg 3 with server-side prepared
    statements and Feast's startup options works; transaction pooling would break it."""
    from tests.support.pgbouncer import PgBouncer

    settings = dict(_ini(_docs(rendered, "pgbouncer.yaml")["ConfigMap"]["data"]
                         ["pgbouncer.ini"])["pgbouncer"])
    local = {k: v for k, v in settings.items()
             if k not in {"listen_addr", "listen_port", "auth_type", "auth_file",
                          "server_tls_sslmode", "stats_users"}}
    bouncer = PgBouncer(settings=local)
    bouncer.start()
    try:
        assert _hammer(bouncer) == []
        [pool] = [p for p in bouncer.show("POOLS") if p["database"] == "test"]
        assert pool["pool_mode"] == "session"
    finally:
        bouncer.close()
    transaction = PgBouncer(settings={**local, "pool_mode": "transaction",
                                      "default_pool_size": "2"})
    transaction.start()
    try:
        errors = _hammer(transaction)
    finally:
        transaction.close()
    assert errors and all("_pg3_" in e for e in errors), errors
