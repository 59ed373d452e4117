"""Monitoring configuration: Prometheus rules and their unit tests, Grafana, compose.

promtool must be installed (Debian: the `prometheus` package; .ci/run installs it), and so
must the Redis and PostgreSQL exporters and PgBouncer (Debian: prometheus-redis-exporter,
prometheus-postgres-exporter, pgbouncer), which the backing-services dashboard's test runs
against real servers. Their absence fails these tests instead of skipping them: a check CI
skips is a check nobody runs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deployments.observability.catalog import exported_names
from deployments.observability.slo import DEFAULT_OBJECTIVES

ROOT = Path(__file__).resolve().parents[3]
MON = ROOT / "configs" / "monitoring"
PROM = MON / "prometheus"
GRAFANA = MON / "grafana"
COMPOSE = ROOT / "cluster" / "compose" / "docker-compose.yaml"
DASHBOARD = GRAFANA / "dashboards" / "keel-slo.json"
BACKING = GRAFANA / "dashboards" / "keel-backing-services.json"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is not installed (apt-get install prometheus); .ci/run installs it"
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr


def ray_names() -> set[str]:
    """Series names in the verified Ray list (histograms expanded)."""
    names: set[str] = set()
    for line in (MON / "ray_metric_names.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kind, *_ = line.split("\t")
        names |= ({name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram"
                  else {name})
    return names


def recorded_names() -> set[str]:
    return {rule["record"] for path in RULE_FILES
            for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a tokenizer, enough for our own queries)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)               # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)                           # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                          # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*(\()?", expr):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_metric_name_tokenizer() -> None:
    expr = ('sum by (le) (rate(ray_keel_x_bucket{le=~"25(\\\\.0)?", a="b or c"}[5m])) '
            '/ ignoring (slo) keel:y:rate5m > bool 0.5')
    assert metric_names(expr) == {"ray_keel_x_bucket", "keel:y:rate5m"}


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def to_promql(expr: str) -> str:
    """A Grafana query as plain PromQL: variables replaced by what they expand to."""
    if expr.startswith("label_values("):  # Grafana's function, not PromQL: check its metric
        inner = expr[len("label_values("):].rsplit(",", 1)[0]
        return inner
    return (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            .replace("$application", ".*"))


# --- Prometheus -------------------------------------------------------------------------

def test_prometheus_config_and_rules_pass_promtool_check() -> None:
    assert_ok(promtool("check", "config", str(PROM / "prometheus.yml")))
    assert_ok(promtool("check", "rules", *map(str, RULE_FILES)))


@pytest.mark.slow
def test_alert_unit_tests_pass() -> None:
    """Each alert fires on a synthetic burn and stays silent on healthy/recovered series."""
    tests = sorted((PROM / "tests").glob("*.yml"))
    assert len(tests) >= 2
    assert_ok(promtool("test", "rules", *map(str, tests)))


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = {r["alert"] for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    fired: set[str] = set()
    silent: set[str] = set()
    for path in (PROM / "tests").glob("*.yml"):
        doc = yaml.safe_load(path.read_text())
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    fired.add(case["alertname"])
                    series = {s["series"] for s in test["input_series"]}
                    labels = [a["exp_labels"] for a in case["exp_alerts"]]
                    # some input series must be for something that did not alert
                    if any(not any(all(f'{k}="{v}"' in s for k, v in lab.items()
                                       if k not in {"severity", "slo"}) for lab in labels)
                           for s in series):
                        silent.add(case["alertname"])
                else:
                    silent.add(case["alertname"])
    assert alerts - fired == set(), "alerts never shown to fire"
    assert alerts - silent == set(), "alerts never shown to stay silent"


def test_rules_use_only_exported_or_recorded_names() -> None:
    known = exported_names() | ray_names() | recorded_names() | {"up"}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                unknown = metric_names(rule["expr"]) - known
                name = rule.get("record") or rule.get("alert")
                assert not unknown, f"{path.name} {name}: {unknown}"


def test_rules_windows_cover_the_alerts() -> None:
    recorded = recorded_names()
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    missing = {n for n in metric_names(rule["expr"]) if ":" in n} - recorded
                    assert not missing, f"{rule['alert']} reads unrecorded {missing}"


def test_podmonitor_targets_head_and_workers_metrics_port() -> None:
    docs = list(yaml.safe_load_all((PROM / "podmonitor.yaml").read_text()))
    assert {d["kind"] for d in docs} == {"PodMonitor"}
    selectors = {d["spec"]["selector"]["matchLabels"]["ray.io/node-type"] for d in docs}
    assert selectors == {"head", "worker"}
    for d in docs:
        assert "metrics" in {e["port"] for e in d["spec"]["podMetricsEndpoints"]}


# --- Grafana ----------------------------------------------------------------------------

def test_dashboard_queries_parse(tmp_path: Path) -> None:
    rules = [{"record": f"keel_dashboard:check_{i}", "expr": to_promql(e)}
             for i, e in enumerate(dashboard_exprs())]
    assert len(rules) >= 20
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_ok(promtool("check", "rules", str(path)))


def test_dashboard_uses_only_known_metric_names() -> None:
    known = exported_names() | ray_names() | recorded_names()
    for expr in dashboard_exprs():
        unknown = metric_names(to_promql(expr)) - known
        assert not unknown, f"{expr}: {unknown}"


@pytest.mark.parametrize("path", [DASHBOARD, BACKING], ids=lambda p: p.name)
def test_dashboard_is_templated_on_datasource(path: Path) -> None:
    dash = json.loads(path.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_grafana_provisioning_files() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA / "provisioning/dashboards/keel.yml").read_text())
    paths = {p["name"]: p["options"]["path"] for p in prov["providers"]}
    assert paths["Keel"] == "/var/lib/grafana/dashboards/keel"
    assert paths["Ray"].startswith("/tmp/ray/session_latest/metrics/grafana/dashboards")


# --- compose ----------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_images_are_pinned() -> None:
    services = compose()["services"]
    assert {"redis", "prometheus", "grafana", "pyroscope", "jaeger", "postgres", "pgbouncer",
            "redis-exporter", "postgres-exporter", "pgbouncer-exporter"} <= set(services)
    for name, svc in services.items():
        image = svc["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: {image} has no tag"
        assert not image.endswith(":latest"), f"{name}: {image}"


def test_compose_mounts_exist_and_point_at_the_configs() -> None:
    services = compose()["services"]
    targets: dict[str, dict[str, Path]] = {}
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                path = (COMPOSE.parent / source).resolve()
                assert path.exists(), f"{name}: {source} does not exist"
                targets.setdefault(name, {})[target] = path
    prom = targets["prometheus"]
    assert prom["/etc/prometheus/prometheus.yml"] == PROM / "prometheus.yml"
    assert prom["/etc/prometheus/rules"] == PROM / "rules"
    graf = targets["grafana"]
    assert graf["/etc/grafana/provisioning/datasources"] == GRAFANA / "provisioning/datasources"
    assert graf["/etc/grafana/provisioning/dashboards"] == GRAFANA / "provisioning/dashboards"
    assert graf["/var/lib/grafana/dashboards/keel"] == GRAFANA / "dashboards"
    # Prometheus reads Ray's SD file from the host's /tmp/ray at the same path
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    sd_files = [f for job in config["scrape_configs"] for sd in job.get("file_sd_configs", [])
                for f in sd["files"]]
    assert sd_files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert "/tmp/ray:/tmp/ray:ro" in services["prometheus"]["volumes"]
    # rule_files in prometheus.yml resolve next to the mounted config
    for rule_file in config["rule_files"]:
        assert (PROM / rule_file).exists()


def test_compose_ports_unique() -> None:
    ports: list[str] = []
    for svc in compose()["services"].values():
        for port in svc.get("ports", []):
            ports.append(str(port).rsplit(":", 1)[0].split(":")[-1])
        for arg in svc.get("command", []) if svc.get("network_mode") == "host" else []:
            if str(arg).startswith("--web.listen-address="):
                ports.append(str(arg).rsplit(":", 1)[1])
    assert len(ports) == len(set(ports)), ports
    assert "9090" in ports and "6379" in ports


def test_burn_rate_rules_match_the_slo_defaults() -> None:
    """The rules' allowed bad shares and thresholds are the SloMonitor's defaults."""
    rules = yaml.safe_load((ROOT / "configs/monitoring/prometheus/rules/keel-recording.yml")
                           .read_text())
    burns = [r for g in rules["groups"] for r in g["rules"]
             if str(r.get("record", "")).startswith("keel:slo_burn_rate")]
    assert burns
    for objective in DEFAULT_OBJECTIVES:
        mine = [r for r in burns if r["labels"]["slo"] == objective.name]
        assert mine, f"no burn-rate rule for {objective.name}"
        for rule in mine:
            divisor = float(re.search(r"/\s*([0-9.]+)\s*$", rule["expr"].strip()).group(1))
            assert divisor == pytest.approx(1 - objective.goal), (objective.name, rule["expr"])
            if objective.kind == "latency":
                assert f"within_{int(objective.threshold_ms or 0)}ms" in rule["expr"]


# --- backing services: exporters, their scrape jobs, the dashboard ------------------------

#: Scrape job -> (compose service, its image without tag) of each exporter.
EXPORTERS = {"redis": ("redis-exporter", "oliver006/redis_exporter"),
             "postgres": ("postgres-exporter", "prometheuscommunity/postgres-exporter"),
             "pgbouncer": ("pgbouncer-exporter", "prometheuscommunity/pgbouncer-exporter")}

#: prometheuscommunity/pgbouncer-exporter's mapping of PgBouncer's SHOW POOLS columns to
#: metric names (its collector.go, metricMaps["pools"]: pgbouncer_pools_<name>), and the
#: names it exports whatever PgBouncer answers. No Debian package of that exporter (Debian's
#: prometheus-pgbouncer-exporter is another project with other names), so the test checks
#: the columns on a real PgBouncer and the names through this table.
PGBOUNCER_POOL_COLUMNS = {
    "cl_active": "client_active_connections", "cl_waiting": "client_waiting_connections",
    "sv_active": "server_active_connections", "sv_idle": "server_idle_connections",
    "sv_used": "server_used_connections", "sv_tested": "server_testing_connections",
    "sv_login": "server_login_connections", "maxwait": "client_maxwait_seconds",
}
PGBOUNCER_ALWAYS = {"pgbouncer_up"}


def test_backing_dashboard_queries_parse(tmp_path: Path) -> None:
    exprs = dashboard_exprs(BACKING)
    rules = [{"record": f"keel_dashboard:backing_{i}", "expr": to_promql(e)}
             for i, e in enumerate(exprs)]
    assert len(rules) >= 15
    path = tmp_path / "backing-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "backing", "rules": rules}]}))
    assert_ok(promtool("check", "rules", str(path)))


def test_backing_dashboard_covers_redis_postgres_and_pgbouncer() -> None:
    names = set().union(*(metric_names(to_promql(e)) for e in dashboard_exprs(BACKING)))
    # Redis memory, hit rate, evictions; PostgreSQL connections; PgBouncer pools.
    assert {"redis_memory_used_bytes", "redis_memory_max_bytes", "redis_keyspace_hits_total",
            "redis_keyspace_misses_total", "redis_evicted_keys_total"} <= names
    assert {"pg_stat_database_numbackends", "pg_settings_max_connections",
            "pg_stat_activity_count"} <= names
    assert {"pgbouncer_pools_client_active_connections",
            "pgbouncer_pools_client_waiting_connections",
            "pgbouncer_pools_server_active_connections"} <= names


def test_exporters_are_scraped_where_compose_publishes_them() -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
            for job in config["scrape_configs"]}
    services = compose()["services"]
    for job, (service, image) in EXPORTERS.items():
        svc = services[service]
        assert svc["image"].split(":")[0] == image, service
        published = {str(p).split(":")[1] for p in svc["ports"]}
        assert [t.split(":")[1] for t in jobs[job]] == list(published), (job, jobs[job])
    # The PgBouncer and PostgreSQL of compose run the pooling the docs and K8s describe.
    bouncer = services["pgbouncer"]["environment"]
    assert bouncer["POOL_MODE"] == "session"
    assert "options" in bouncer["IGNORE_STARTUP_PARAMETERS"].split(",")


def _exporter_binary(name: str) -> str:
    exe = shutil.which(name)
    assert exe, f"{name} is not installed (Debian package {name}; .ci/run installs it)"
    return exe


def _scrape(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 15) -> dict[str, float]:
    """Every sample of the exporter's /metrics, by name (labels summed away)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            break
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return samples


@pytest.fixture
def exporter_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def _panel_names(prefix: str) -> set[str]:
    names = set().union(*(metric_names(to_promql(e)) for e in dashboard_exprs(BACKING)))
    return {n for n in names if n.startswith(prefix)}


def test_redis_exporter_exports_what_the_panels_query(
        exporter_procs: list[subprocess.Popen[bytes]]) -> None:
    """Debian's build of oliver006/redis_exporter (the compose image's version) against a
    private Redis made to hit, miss and evict."""
    from tests.support.redisserver import PrivateRedis, free_port

    server = PrivateRedis()
    server.start()
    try:
        client = server.client()
        client.config_set("maxmemory", "2mb")
        client.config_set("maxmemory-policy", "allkeys-lru")
        for i in range(400):  # ~4 MB into 2 MB: evictions
            client.set(f"k{i}", b"x" * 10_000)
        client.get("k399")
        client.get("never-set")
        port = free_port()
        exporter_procs.append(subprocess.Popen(
            [_exporter_binary("prometheus-redis-exporter"), "-redis.addr",
             f"redis://127.0.0.1:{server.port}", "-web.listen-address", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        samples = _scrape(port, exporter_procs[-1])
    finally:
        server.stop()
    missing = _panel_names("redis_") - set(samples)
    assert not missing, f"the panels query names redis_exporter does not export: {missing}"
    assert samples["redis_up"] == 1
    assert samples["redis_memory_max_bytes"] == 2 * 1024 * 1024
    assert samples["redis_evicted_keys_total"] > 0
    assert samples["redis_keyspace_hits_total"] >= 1
    assert samples["redis_keyspace_misses_total"] >= 1
    assert 0 < samples["redis_memory_used_bytes"] <= 3 * 1024 * 1024


def test_postgres_exporter_exports_what_the_panels_query(
        exporter_procs: list[subprocess.Popen[bytes]]) -> None:
    """Debian's build of prometheuscommunity/postgres-exporter (the compose image's
    version) against the machine's PostgreSQL, with a connection of ours open."""
    import psycopg

    from tests.support.pgbouncer import pg_user
    from tests.support.redisserver import free_port

    port = free_port()
    dsn = f"postgresql://{pg_user()}@127.0.0.1:5432/test?sslmode=disable"
    with psycopg.connect(host="127.0.0.1", dbname="test", user=pg_user()):
        exporter_procs.append(subprocess.Popen(
            [_exporter_binary("prometheus-postgres-exporter"),
             f"--web.listen-address=127.0.0.1:{port}"],
            env={"DATA_SOURCE_NAME": dsn, "PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        samples = _scrape(port, exporter_procs[-1])
    missing = _panel_names("pg_") - set(samples)
    assert not missing, f"the panels query names postgres_exporter does not export: {missing}"
    assert samples["pg_up"] == 1
    assert samples["pg_stat_database_numbackends"] >= 1
    assert samples["pg_settings_max_connections"] > 0


def test_pgbouncer_answers_the_columns_the_exporter_maps() -> None:
    """A real PgBouncer (the tests' private one) with a client holding a session: SHOW POOLS
    has every column the pgbouncer-exporter maps to the names the panels query."""
    from tests.support.pgbouncer import PgBouncer

    bouncer = PgBouncer()
    bouncer.start()
    try:
        with bouncer.connect() as conn:
            conn.execute("SELECT 1")
            [pool] = [p for p in bouncer.show("POOLS") if p["database"] == "test"]
    finally:
        bouncer.close()
    exported = {f"pgbouncer_pools_{PGBOUNCER_POOL_COLUMNS[c]}" for c in pool
                if c in PGBOUNCER_POOL_COLUMNS} | PGBOUNCER_ALWAYS
    missing = _panel_names("pgbouncer_") - exported
    assert not missing, f"the panels query names PgBouncer's SHOW POOLS does not feed: {missing}"
    assert set(PGBOUNCER_POOL_COLUMNS) <= set(pool)
    assert pool["cl_active"] == 1 and pool["sv_active"] == 1  # our session, paired
