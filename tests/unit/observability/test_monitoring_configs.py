"""Monitoring configuration: Prometheus rules and their unit tests, Grafana, compose.

promtool must be installed (Debian: the `prometheus` package; .ci/run installs it). Its
absence fails these tests instead of skipping them: a check CI skips is a check nobody runs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deployments.observability.catalog import exported_names
from deployments.observability.slo import DEFAULT_OBJECTIVES

ROOT = Path(__file__).resolve().parents[3]
MON = ROOT / "configs" / "monitoring"
PROM = MON / "prometheus"
GRAFANA = MON / "grafana"
COMPOSE = ROOT / "cluster" / "compose" / "docker-compose.yaml"
DASHBOARD = GRAFANA / "dashboards" / "keel-slo.json"
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


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
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


def test_dashboard_is_templated_on_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
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
    assert {"redis", "prometheus", "grafana", "pyroscope", "jaeger"} <= set(services)
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
