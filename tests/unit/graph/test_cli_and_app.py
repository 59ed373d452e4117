"""`keel check-config`, `keel prepare`/`models`, and build_app's refusals (no Ray started)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.errors import ConfigError
from graph.app import AppArgs, build_app, resolve_repository
from graph.cli import main
from graph.config_check import check_serve_config
from tests.support.modelkit import write_linear_model

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = [ROOT / "serve_config.yaml", *sorted((ROOT / "configs" / "serve").glob("*.yaml"))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    assert check_serve_config(path) == []


def _write(tmp_path: Path, mutate: Any) -> Path:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    mutate(config["applications"][0])
    target = tmp_path / "config.yaml"
    target.write_text(yaml.safe_dump(config))
    return target


def _dep(app: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in app["deployments"] if d["name"] == name)  # type: ignore[no-any-return]


def test_max_ongoing_requests_below_batch_size_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda app: _dep(app, "risk_gbdt").update(max_ongoing_requests=8))
    [problem] = check_serve_config(path)
    assert "deployments[3] (risk_gbdt)" in problem
    assert "max_ongoing_requests (8)" in problem and "max_batch_size (32)" in problem


def test_ray_default_max_ongoing_requests_counts(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda app: _dep(app, "risk_gbdt").pop("max_ongoing_requests"))
    [problem] = check_serve_config(path)
    assert "risk_gbdt" in problem and "max_ongoing_requests (5)" in problem


def test_max_queued_requests_below_the_ingress_calls_in_flight_is_named(
        tmp_path: Path) -> None:
    """Ray's router counts a call as queued until a replica takes it: a model whose
    max_queued_requests is below the calls one ingress replica sends at once has calls
    turned away while its replicas have room (the overload serve test's 503s were that)."""
    path = _write(tmp_path, lambda app: _dep(app, "risk_gbdt").update(max_queued_requests=2))
    [problem] = check_serve_config(path)
    assert "deployments[3] (risk_gbdt).max_queued_requests: 2" in problem
    assert "calls_in_flight (4)" in problem
    for fine in (4, -1):
        path = _write(tmp_path,
                      lambda app, q=fine: _dep(app, "risk_gbdt").update(max_queued_requests=q))
        assert check_serve_config(path) == []
    path = _write(tmp_path, lambda app: (
        _dep(app, "risk_gbdt").update(max_queued_requests=8),
        _dep(app, "Ingress")["user_config"].update(calls_in_flight=16)))
    [problem] = check_serve_config(path)
    assert "max_queued_requests: 8" in problem and "calls_in_flight (16)" in problem


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda app: _dep(app, "risk_gbdt")["user_config"].update(max_batch_sise=4),
         "(risk_gbdt).user_config.max_batch_sise"),
        (lambda app: _dep(app, "risk_gbdt")["user_config"].update(batch_wait_timeout_s=-1),
         "user_config.batch_wait_timeout_s"),
        (lambda app: _dep(app, "Ingress")["user_config"].update(max_body_bytes=10),
         "(Ingress).user_config.max_body_bytes"),
        (lambda app: _dep(app, "Ingress")["user_config"].update(payloads={"rate": 2}),
         "(Ingress).user_config.payloads.rate"),
        (lambda app: app["args"].update(model_repo="x"), "args.model_repo"),
        (lambda app: _dep(app, "risk_gbdt").update(num_replicas="many"), "num_replicas"),
        (lambda app: _dep(app, "FeatureService")["user_config"].update(lookup_timeout_s=0),
         "(FeatureService).user_config.lookup_timeout_s"),
        (lambda app: _dep(app, "Ingress")["user_config"]["cache"].update(hash="md5"),
         "(Ingress).user_config.cache.hash"),
        (lambda app: _dep(app, "Ingress")["user_config"].update(max_entities=0),
         "(Ingress).user_config.max_entities"),
        (lambda app: _dep(app, "SloMonitor")["user_config"].update(windows=["1m", "2m"]),
         "(SloMonitor).user_config.windows.1"),
        (lambda app: _dep(app, "SloMonitor")["user_config"]["objectives"][1].update(
            threshold_ms=-80), "(SloMonitor).user_config.objectives.1.threshold_ms"),
        (lambda app: _dep(app, "Ingress")["user_config"].update(max_requests=0),
         "(Ingress).user_config.max_requests"),
        (lambda app: _dep(app, "Ingress").update(max_ongoing_requests=1280),
         "(Ingress).max_ongoing_requests: 1280 must be above user_config.max_requests (1280)"),
        (lambda app: _dep(app, "risk_gbdt")["user_config"].update(traffic={"1": -5}),
         "(risk_gbdt).user_config.traffic"),
        (lambda app: _dep(app, "risk_gbdt")["user_config"].update(traffic={"1": 0, "2": 0}),
         "every weight is 0"),
        (lambda app: _dep(app, "Ingress")["user_config"]["models"]["risk_mlp"].update(
            traffic={"1": 1}, version="2"), "(Ingress).user_config.models.risk_mlp"),
        (lambda app: _dep(app, "risk_gbdt")["user_config"].update(
            version="1", shadow={"version": "1"}), "(risk_gbdt).user_config.shadow"),
        (lambda app: _dep(app, "risk_gbdt")["user_config"].update(
            shadow={"version": "2", "fraction": 2}), "(risk_gbdt).user_config.shadow.fraction"),
        (lambda app: _dep(app, "Ingress")["user_config"].update(shadow_queue=-1),
         "(Ingress).user_config.shadow_queue"),
    ],
    ids=["unknown-knob", "negative-wait", "tiny-body-limit", "payload-rate", "unknown-arg",
         "ray-schema",
         "feature-timeout", "cache-hash", "max-entities", "slo-window", "slo-threshold",
         "max-requests", "ray-below-keel", "negative-weight", "zero-weights",
         "served-not-in-split", "shadow-is-live", "shadow-fraction", "shadow-queue"],
)
def test_config_errors_name_the_field(tmp_path: Path, mutate: Any, expected: str) -> None:
    problems = check_serve_config(_write(tmp_path, mutate))
    assert any(expected in p for p in problems), problems


def _repository(tmp_path: Path) -> Path:
    """Version 1 of every model serve_config.yaml names, and risk_gbdt version 2."""
    repository = tmp_path / "models"
    for name in ("risk_mlp", "risk_gbdt", "risk_mlp_int8"):
        write_linear_model(repository, name, "1")
    write_linear_model(repository, "risk_gbdt", "2", seed=1)
    return repository


def test_versions_a_config_names_must_be_in_its_repository(tmp_path: Path) -> None:
    repository = _repository(tmp_path)

    def mutate(app: dict[str, Any]) -> None:
        app["args"]["model_repository"] = str(repository)
        _dep(app, "risk_gbdt")["user_config"]["traffic"] = {"1": 90, "2": 5, "3": 5}
        _dep(app, "Ingress")["user_config"]["models"]["risk_mlp"]["version"] = "4"
        _dep(app, "Ingress")["user_config"]["models"]["risk_mlp_int8"]["shadow"] = {
            "version": "9"}

    problems = check_serve_config(_write(tmp_path, mutate))
    assert any("(risk_gbdt).user_config.traffic: model 'risk_gbdt' has no version ['3'] "
               "(versions: ['1', '2'])" in p for p in problems), problems
    assert any("(Ingress).user_config.models.risk_mlp.version: model 'risk_mlp' has no "
               "version '4'" in p for p in problems), problems
    assert any("(Ingress).user_config.models.risk_mlp_int8.shadow.version: model "
               "'risk_mlp_int8' has no "
               "version '9'" in p for p in problems), problems
    assert len(problems) == 3, problems


def test_a_shadow_on_the_latest_version_is_refused_when_that_is_the_served_one(
        tmp_path: Path) -> None:
    repository = _repository(tmp_path)

    def mutate(app: dict[str, Any]) -> None:
        app["args"]["model_repository"] = str(repository)
        config = _dep(app, "risk_gbdt")["user_config"]
        config.pop("version", None)
        config["shadow"] = {"version": "2"}

    problems = check_serve_config(_write(tmp_path, mutate))
    assert len(problems) == 1 and problems[0].endswith(
        "(risk_gbdt).user_config.shadow.version: '2' is model 'risk_gbdt''s latest version, "
        "which it serves; pin 'version' to another one"), problems


def test_check_config_command_exit_codes(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(ROOT / "serve_config.yaml")]) == 0
    bad = _write(tmp_path, lambda app: _dep(app, "risk_gbdt").update(max_ongoing_requests=1))
    assert main(["check-config", str(bad)]) == 1
    assert "max_ongoing_requests (1)" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("applications: [")
    assert main(["check-config", str(broken)]) == 1


def test_models_command_lists_versions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_linear_model(tmp_path, "linear", "1")
    write_linear_model(tmp_path, "linear", "10", seed=3)
    assert main(["models", "--repository", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"linear": ["1", "10"]}


def test_build_app_binds_one_deployment_per_model(tmp_path: Path) -> None:
    write_linear_model(tmp_path, "a")
    write_linear_model(tmp_path, "b")
    app = build_app({"model_repository": str(tmp_path)})
    ingress = app._bound_deployment
    assert ingress.name == "Ingress" and ingress.user_config == {}
    models = ingress.init_kwargs["models"]
    assert sorted(models) == ["a", "b"]
    model_a = models["a"]._bound_deployment
    assert model_a.name == "a"
    # user_config={} makes Serve call reconfigure(), where the batch limits are checked.
    assert model_a.init_args == ("a", str(tmp_path.resolve())) and model_a.user_config == {}
    only_b = build_app(AppArgs(model_repository=str(tmp_path), models=["b"]))
    assert sorted(only_b._bound_deployment.init_kwargs["models"]) == ["b"]


def test_build_app_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_MODEL_REPOSITORY", raising=False)
    with pytest.raises(ConfigError, match="keel prepare"):
        build_app({"model_repository": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="holds no model"):
        build_app({"model_repository": str(tmp_path)})
    write_linear_model(tmp_path, "a")
    with pytest.raises(ConfigError, match=r"args.models: \['zzz'\]"):
        build_app({"model_repository": str(tmp_path), "models": ["zzz"]})
    (tmp_path / "a" / "1" / "model.yaml").write_text("inputs: []\noutputs: []\n")
    with pytest.raises(ConfigError, match=r"a/1/model.yaml: inputs: List should have at least"):
        build_app({"model_repository": str(tmp_path)})


def test_build_app_binds_the_feature_service(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_FEATURE_REPO", raising=False)
    monkeypatch.delenv("KEEL_FEATURE_STORE_YAML", raising=False)
    write_linear_model(tmp_path / "models", "a")
    feast = tmp_path / "feast"
    feast.mkdir()
    (feast / "feature_store.yaml").write_text("project: x\n")
    (feast / "other.yaml").write_text("project: y\n")
    app = build_app({"model_repository": str(tmp_path / "models"), "feature_repo": str(feast)})
    features = app._bound_deployment.init_kwargs["features"]._bound_deployment
    assert features.name == "FeatureService" and features.user_config == {}
    assert features.init_args == (str(feast.resolve()), str(feast.resolve() / "feature_store.yaml"))
    monkeypatch.setenv("KEEL_FEATURE_STORE_YAML", "other.yaml")
    app = build_app({"model_repository": str(tmp_path / "models"), "feature_repo": str(feast)})
    bound = app._bound_deployment.init_kwargs["features"]._bound_deployment
    assert bound.init_args[1].endswith("other.yaml")
    monkeypatch.setenv("KEEL_FEATURE_STORE_YAML", "missing.yaml")
    with pytest.raises(ConfigError, match=r"args\.feature_store_yaml.*missing\.yaml"):
        build_app({"model_repository": str(tmp_path / "models"), "feature_repo": str(feast)})
    with pytest.raises(ConfigError, match="feature repository"):
        build_app({"model_repository": str(tmp_path / "models"),
                   "feature_repo": str(tmp_path / "nowhere")})
    off = build_app({"model_repository": str(tmp_path / "models"), "feature_repo": None})
    # no FeatureService: /v1/decide is 503
    assert off._bound_deployment.init_kwargs["features"] is None
    monitor = off._bound_deployment.init_kwargs["slo_monitor"]._bound_deployment
    assert monitor.name == "SloMonitor" and monitor.user_config == {}


def test_repository_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_linear_model(tmp_path, "from_env")
    monkeypatch.setenv("KEEL_MODEL_REPOSITORY", str(tmp_path))
    app = build_app({"model_repository": "models"})
    assert app._bound_deployment.init_kwargs["args"]["repository"] == str(tmp_path.resolve())
    assert resolve_repository(str(tmp_path)) == tmp_path.resolve()


@pytest.mark.parametrize(
    ("grpc_options", "expected"),
    [({"port": 9000, "grpc_servicer_functions": ["deployments.ingress.nope.add"]},
      "grpc_options.grpc_servicer_functions[0]: cannot import"),
     ({"port": 9000, "grpc_servicer_functions": ["deployments.ingress.grpc.protocol.SERVICE"]},
      "is not a function"),
     ({"port": 8000, "grpc_servicer_functions":
       ["deployments.ingress.grpc.protocol.add_inference_servicer"]},
      "grpc_options.port: 8000 is also http_options.port")],
    ids=["unimportable", "not-callable", "port-clash"],
)
def test_grpc_options_errors_name_the_field(tmp_path: Path, grpc_options: dict[str, Any],
                                            expected: str) -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["grpc_options"] = grpc_options
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    problems = check_serve_config(path)
    assert any(expected in p for p in problems), problems


def test_the_grpc_message_ceiling_is_checked_against_the_body_limit(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    assert int(app["runtime_env"]["env_vars"]["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) >= \
        _dep(app, "Ingress")["user_config"]["max_body_bytes"]
    path = tmp_path / "serve_config.yaml"
    app["runtime_env"]["env_vars"]["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = "1024"
    path.write_text(yaml.safe_dump(config))
    [problem] = check_serve_config(path)
    assert "runtime_env.env_vars.RAY_SERVE_GRPC_MAX_MESSAGE_SIZE: 1024 is below" in problem
    del app["runtime_env"]
    path.write_text(yaml.safe_dump(config))
    [problem] = check_serve_config(path)
    assert "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE: not set" in problem
    del config["grpc_options"]  # no gRPC: no ceiling needed
    path.write_text(yaml.safe_dump(config))
    assert check_serve_config(path) == []


# --- fleets -------------------------------------------------------------------------------


def _fleet_repository(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    write_linear_model(repository, "a")
    for name in ("t1", "t2"):
        write_linear_model(repository / "tenants", name, seed=3)
    return repository


def test_build_app_binds_a_fleet_deployment(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_MODEL_REPOSITORY", raising=False)
    repository = _fleet_repository(tmp_path)
    app = build_app({"model_repository": str(repository), "feature_repo": None,
                     "fleets": {"Tenants": {"directory": "tenants",
                                            "max_models_per_replica": 4}}})
    args = app._bound_deployment.init_kwargs
    assert app._bound_deployment.init_args == ()  # bound by keyword
    assert sorted(args["models"]) == ["a"]  # the fleet's members are not deployments of their own
    fleet = args["fleets"]["Tenants"]._bound_deployment
    assert fleet.name == "Tenants" and fleet.user_config == {}
    directory = str(repository.resolve() / "tenants")
    assert fleet.init_args == ("Tenants", directory, 4)
    assert args["args"]["fleet_directories"] == {"Tenants": directory}
    # A repository of fleets only is a valid application.
    shutil.rmtree(repository / "a")
    only = build_app({"model_repository": str(repository), "feature_repo": None,
                      "fleets": {"Tenants": {"directory": "tenants"}}})
    assert only._bound_deployment.init_kwargs["models"] == {}


@pytest.mark.parametrize(("fleets", "expected"), [
    ({"Ingress": {"directory": "tenants"}}, "one of Keel's own deployments"),
    ({"bad name": {"directory": "tenants"}}, "not a valid deployment name"),
    ({"A": {"directory": "tenants"}, "B": {"directory": "tenants"}},
     "named by more than one fleet"),
    ({"Tenants": {"directory": "tenants", "max_models_per_replica": 0}},
     "max_models_per_replica"),
    ({"Tenants": {"directory": "nowhere"}}, r"args.fleets.Tenants.directory: .*nowhere"),
    ({"a": {"directory": "tenants"}}, "'a' is also a model of the repository"),
])
def test_build_app_refuses_a_bad_fleet_naming_the_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fleets: dict[str, Any],
        expected: str) -> None:
    from pydantic import ValidationError

    monkeypatch.delenv("KEEL_MODEL_REPOSITORY", raising=False)
    repository = _fleet_repository(tmp_path)
    with pytest.raises((ConfigError, ValidationError), match=expected):
        build_app({"model_repository": str(repository), "feature_repo": None,
                   "fleets": fleets})


def test_build_app_refuses_a_member_named_like_a_model(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_MODEL_REPOSITORY", raising=False)
    repository = _fleet_repository(tmp_path)
    write_linear_model(repository / "tenants", "a")
    with pytest.raises(ConfigError, match=r"args.fleets.Tenants: \['a'\] are both fleet "
                                          r"members and models"):
        build_app({"model_repository": str(repository), "feature_repo": None,
                   "fleets": {"Tenants": {"directory": "tenants"}}})


def test_check_config_names_fleet_problems(tmp_path: Path) -> None:
    repository = _repository(tmp_path)
    write_linear_model(repository / "tenants", "t1")

    def mutate(app: dict[str, Any]) -> None:
        app["args"]["model_repository"] = str(repository)
        app["args"]["fleets"] = {"Tenants": {"directory": "tenant"}}
        app["deployments"].append({"name": "Tenants", "user_config": {
            "runtime": {"intra_op_num_threads": -1}, "max_batch_size": 8}})

    problems = check_serve_config(_write(tmp_path, mutate))
    assert any("args.fleets.Tenants.directory: " in p and "tenant' does not exist" in p
               for p in problems), problems
    assert any("(Tenants).user_config.runtime.intra_op_num_threads" in p for p in problems)
    assert any("(Tenants).user_config.max_batch_size" in p for p in problems), problems
    assert len(problems) == 3, problems

    def bad_args(app: dict[str, Any]) -> None:
        app["args"]["fleets"] = {"Tenants": {"directory": "tenants", "size": 3}}

    problems = check_serve_config(_write(tmp_path, bad_args))
    assert any("args.fleets.Tenants.size" in p for p in problems), problems
