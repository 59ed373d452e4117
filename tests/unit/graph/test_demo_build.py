"""The demo data set and the builder of the demo model repository (no Ray)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")
ort = pytest.importorskip("onnxruntime")

from deployments.repository import ORT_TYPES, ModelRepository  # noqa: E402
from graph.demo.build import (  # noqa: E402
    CANDIDATE_NAMES,
    CANDIDATE_VERSION,
    FLEET_DIRECTORY,
    MANIFEST_FILE,
    MODEL_NAMES,
    BuiltModel,
    build_candidates,
    build_demo_repository,
    build_fleet,
    tenant_name,
)
from graph.demo.dataset import (  # noqa: E402
    FEATURE_NAMES,
    FEATURE_REFS,
    MARKET_FEATURES,
    PORTFOLIO_FEATURES,
    Dataset,
    DatasetConfig,
    generate,
    training_matrix,
)

# Small enough to train in a couple of seconds, large enough for stable metrics.
SMALL = DatasetConfig(n_symbols=20, n_accounts=50, n_days=20, n_train_rows=4000)
# Largest |P_int8 - P_fp32| allowed on 256 rows. Measured 0.009 for SMALL and
# 0.058 over the full default holdout (4,000 rows) on an AVX2 CPU without VNNI.
INT8_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def small_dataset() -> Dataset:
    return generate(SMALL)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[BuiltModel]]:
    root = tmp_path_factory.mktemp("models")
    return root, build_demo_repository(root, config=SMALL)


# --- data set ---------------------------------------------------------------------------


def test_feature_refs_order() -> None:
    assert [ref.split(":")[1] for ref in FEATURE_REFS] == MARKET_FEATURES + PORTFOLIO_FEATURES
    assert FEATURE_REFS[0] == "market_features:ret_1d"
    assert FEATURE_REFS[-1] == "portfolio_features:num_positions"
    assert len(FEATURE_REFS) == 12


def test_generate_is_deterministic(small_dataset: Dataset) -> None:
    again = generate(SMALL)
    for name in ("market", "portfolio", "training"):
        pd.testing.assert_frame_equal(getattr(small_dataset, name), getattr(again, name))
        assert (pd.util.hash_pandas_object(getattr(small_dataset, name)).to_numpy().tobytes()
                == pd.util.hash_pandas_object(getattr(again, name)).to_numpy().tobytes())
    other = generate(replace(SMALL, seed=SMALL.seed + 1))
    assert not other.market.equals(small_dataset.market)
    assert not other.portfolio.equals(small_dataset.portfolio)
    assert not other.training.equals(small_dataset.training)


def test_columns_and_types(small_dataset: Dataset) -> None:
    market, portfolio = small_dataset.market, small_dataset.portfolio
    training = small_dataset.training
    assert list(market.columns) == ["symbol", "event_timestamp", "created", *MARKET_FEATURES]
    assert list(portfolio.columns) == [
        "account_id", "event_timestamp", "created", *PORTFOLIO_FEATURES
    ]
    assert list(training.columns) == [
        "symbol", "account_id", "event_timestamp", *FEATURE_NAMES, "label"
    ]
    assert len(market) == SMALL.n_symbols * SMALL.n_days
    assert len(portfolio) == SMALL.n_accounts * SMALL.n_days
    assert len(training) == SMALL.n_train_rows
    for frame, features in ((market, MARKET_FEATURES), (portfolio, PORTFOLIO_FEATURES),
                            (training, FEATURE_NAMES)):
        assert not frame.isna().any().any()
        assert all(frame[f].dtype == np.float32 for f in features)
        assert str(frame["event_timestamp"].dt.tz) == "UTC"
    assert market["symbol"].iloc[0] == "SYM000"
    assert portfolio["account_id"].iloc[0] == "ACC0000"
    assert market["event_timestamp"].max() == pd.Timestamp(SMALL.end_date, tz="UTC")
    assert (market["created"] == market["event_timestamp"]).all()
    # Feast sources: sorted by entity, then time, one row per (entity, day).
    for frame, key in ((market, "symbol"), (portfolio, "account_id")):
        assert frame.equals(frame.sort_values([key, "event_timestamp"], kind="stable"))
        assert not frame.duplicated([key, "event_timestamp"]).any()
    assert not training.duplicated(["symbol", "account_id", "event_timestamp"]).any()
    assert set(training["label"].unique()) <= {0, 1}


def test_feature_ranges(small_dataset: Dataset) -> None:
    m, p = small_dataset.market, small_dataset.portfolio
    assert (m["vol_20d"] > 0).all()
    assert m["ret_1d"].abs().median() < 0.05
    assert abs(m["volume_z"].mean()) < 0.2 and 0.7 < m["volume_z"].std() < 1.3
    assert p["leverage"].between(0.5, 5.0).all()
    assert p["concentration"].between(0.0, 1.0).all()
    assert (p["concentration"] >= 1.0 / p["num_positions"] - 1e-6).all()
    assert p["drawdown_30d"].between(-0.5, 0.0).all()
    assert p["margin_utilisation"].between(0.0, 1.0).all()
    assert (p["num_positions"] >= 1).all()
    assert (p["num_positions"] == p["num_positions"].round()).all()
    assert (p["gross_exposure"] > 0).all()


def test_training_rows_join_the_feature_tables(small_dataset: Dataset) -> None:
    # The model is trained on exactly what a Feast lookup of the same keys returns.
    training = small_dataset.training.head(200)
    joined = training[["symbol", "account_id", "event_timestamp"]].merge(
        small_dataset.market, on=["symbol", "event_timestamp"], how="left"
    ).merge(small_dataset.portfolio, on=["account_id", "event_timestamp"], how="left")
    np.testing.assert_array_equal(joined[FEATURE_NAMES].to_numpy(),
                                  training[FEATURE_NAMES].to_numpy())


def test_label_base_rate_and_matrix(small_dataset: Dataset) -> None:
    features, labels = training_matrix(small_dataset)
    assert features.dtype == np.float32 and features.shape == (SMALL.n_train_rows, 12)
    assert labels.dtype == np.int64 and labels.shape == (SMALL.n_train_rows,)
    assert 0.2 <= labels.mean() <= 0.4
    assert np.isfinite(features).all()


def test_config_rejects_more_rows_than_triples() -> None:
    with pytest.raises(ValueError, match="n_train_rows"):
        DatasetConfig(n_symbols=2, n_accounts=2, n_days=2, n_train_rows=9)


# --- repository -------------------------------------------------------------------------


def test_build_writes_every_model(repo: tuple[Path, list[BuiltModel]]) -> None:
    root, built = repo
    assert [b.name for b in built] == list(MODEL_NAMES)
    assert all(not b.skipped and b.version == "1" for b in built)
    assert ModelRepository(root).model_names() == sorted(MODEL_NAMES)
    assert (root / MANIFEST_FILE).is_file()
    assert not list(root.rglob("*.tmp"))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnx_matches_its_spec(repo: tuple[Path, list[BuiltModel]], name: str) -> None:
    root, _ = repo
    repository = ModelRepository(root)
    spec = repository.spec(name)
    session = ort.InferenceSession(str(repository.model_path(name, "1")),
                                   providers=["CPUExecutionProvider"])
    for declared, actual in ((spec.inputs, session.get_inputs()),
                             (spec.outputs, session.get_outputs())):
        assert [t.name for t in declared] == [a.name for a in actual]
        assert [t.datatype for t in declared] == [ORT_TYPES[a.type] for a in actual]
        assert [t.shape for t in declared] == [
            [d if isinstance(d, int) else -1 for d in a.shape] for a in actual
        ]
    assert spec.inputs[0].columns == FEATURE_REFS
    assert spec.decision is not None
    assert (spec.decision.output, spec.decision.index) == ("probabilities", 1)
    assert spec.labels["built_by"] == "keel prepare"
    assert spec.labels["dataset_seed"] == str(SMALL.seed)
    assert spec.description

    x = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    label, probs = session.run(["label", "probabilities"], {"features": x})
    assert label.shape == (5,) and probs.shape == (5, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_metrics_recorded(repo: tuple[Path, list[BuiltModel]], name: str) -> None:
    root, built = repo
    metrics = ModelRepository(root).spec(name).metrics
    assert metrics == next(b.metrics for b in built if b.name == name)
    assert metrics["auc"] > 0.6
    assert 0.5 < metrics["accuracy"] <= 1.0


def test_int8_model_is_quantised_and_close_to_fp32(
    repo: tuple[Path, list[BuiltModel]], small_dataset: Dataset
) -> None:
    root, _ = repo
    repository = ModelRepository(root)
    spec = repository.spec("risk_mlp_int8")
    assert spec.labels["quantized_from"] == "risk_mlp/1"
    assert int(spec.labels["quantized_ops"]) >= 1
    for key in ("fp32_auc", "fp32_accuracy", "max_abs_diff_vs_fp32", "agreement_vs_fp32",
                "max_abs_diff_row_vs_batch"):
        assert key in spec.metrics
    assert spec.metrics["fp32_auc"] == repository.spec("risk_mlp").metrics["auc"]
    assert spec.metrics["agreement_vs_fp32"] > 0.95

    import onnx

    ops = [node.op_type for node in onnx.load(str(repository.model_path("risk_mlp_int8", "1")))
           .graph.node]
    assert ops.count("MatMulInteger") == int(spec.labels["quantized_ops"])

    features, _ = training_matrix(small_dataset)
    x = features[:256]
    fp32 = ort.InferenceSession(str(repository.model_path("risk_mlp", "1")),
                                providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(repository.model_path("risk_mlp_int8", "1")),
                                providers=["CPUExecutionProvider"])
    p32 = fp32.run(["probabilities"], {"features": x})[0]
    p8 = int8.run(["probabilities"], {"features": x})[0]
    assert np.abs(p8 - p32).max() < INT8_TOLERANCE


def test_second_build_is_skipped(repo: tuple[Path, list[BuiltModel]]) -> None:
    root, first = repo
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = build_demo_repository(root, config=SMALL)
    assert all(b.skipped for b in again)
    assert [(b.name, b.version, b.path, b.metrics) for b in again] == [
        (b.name, b.version, b.path, b.metrics) for b in first
    ]
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert after == before


def test_missing_file_or_new_config_rebuilds(tmp_path: Path) -> None:
    config = replace(SMALL, n_train_rows=1500)
    build_demo_repository(tmp_path, config=config)
    (tmp_path / "risk_gbdt" / "1" / "model.onnx").unlink()
    rebuilt = build_demo_repository(tmp_path, config=config)
    assert not any(b.skipped for b in rebuilt)
    assert (tmp_path / "risk_gbdt" / "1" / "model.onnx").is_file()

    other_version = build_demo_repository(tmp_path, config=config, version="2")
    assert not any(b.skipped for b in other_version)
    assert ModelRepository(tmp_path).versions("risk_mlp") == ["1", "2"]


def test_force_rebuilds(tmp_path: Path) -> None:
    config = replace(SMALL, n_train_rows=1500)
    first = build_demo_repository(tmp_path, config=config)
    model = tmp_path / "risk_mlp" / "1" / "model.onnx"
    mtime = model.stat().st_mtime_ns
    before = {b.name: b.path.read_bytes() for b in first}
    steps: list[str] = []
    forced = build_demo_repository(tmp_path, config=config, force=True, step=steps.append)
    assert not any(b.skipped for b in forced)
    assert steps[0] == "generating the demo dataset" and "training risk_gbdt" in steps
    assert steps[-1] == f"writing {tmp_path}"
    assert model.stat().st_mtime_ns > mtime
    # Same inputs, same models: the build is deterministic down to the bytes.
    assert [b.metrics for b in forced] == [b.metrics for b in first]
    assert {b.name: b.path.read_bytes() for b in forced} == before
    steps.clear()
    assert all(b.skipped for b in build_demo_repository(tmp_path, config=config,
                                                        step=steps.append))
    assert steps == []  # nothing to do, nothing said


def test_rejects_bad_version(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="version"):
        build_demo_repository(tmp_path, config=SMALL, version="../x")


# --- the canary candidates --------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def with_candidates(repo: tuple[Path, list[BuiltModel]],
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[BuiltModel]]:
    """The demo repository (copied) with the candidates built beside version 1."""
    import shutil

    root = tmp_path_factory.mktemp("canary") / "models"
    shutil.copytree(repo[0], root)
    build_fleet(root, config=SMALL, size=3)  # canary.yaml's fleet directory
    return root, build_candidates(root, config=SMALL)


def test_candidates_are_a_second_retrained_version(
        repo: tuple[Path, list[BuiltModel]],
        with_candidates: tuple[Path, list[BuiltModel]], small_dataset: Dataset) -> None:
    root, built = with_candidates
    assert [(b.name, b.version, b.skipped) for b in built] == [
        (name, CANDIDATE_VERSION, False) for name in CANDIDATE_NAMES]
    repository = ModelRepository(root)
    for name in CANDIDATE_NAMES:
        assert repository.versions(name) == ["1", "2"]
        assert repository.spec(name, "2").labels["built_by"] == "keel prepare (candidate)"
    assert repository.versions("risk_mlp_int8") == ["1"]
    x = training_matrix(small_dataset)[0][:256].astype(np.float32)
    for model in built:
        assert model.metrics["auc"] > 0.7, model  # a real model, not a copy or noise
        v1 = ort.InferenceSession(str(root / model.name / "1" / "model.onnx"),
                                  providers=["CPUExecutionProvider"])
        v2 = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
        p1 = v1.run(["probabilities"], {"features": x})[0]
        p2 = v2.run(["probabilities"], {"features": x})[0]
        assert np.abs(p1 - p2).max() > 1e-3  # another model: the shadow has something to find
    again = build_candidates(root, config=SMALL)
    assert all(b.skipped for b in again)
    assert [(b.name, b.version, b.metrics) for b in again] == [
        (b.name, b.version, b.metrics) for b in built]
    # The demo build's own record is untouched: it is still up to date.
    assert all(b.skipped for b in build_demo_repository(root, config=SMALL))


def test_the_canary_config_checks_against_a_repository_with_the_candidates(
        with_candidates: tuple[Path, list[BuiltModel]], tmp_path: Path) -> None:
    import shutil

    import yaml

    from graph.config_check import check_serve_config

    root, _ = with_candidates
    config = yaml.safe_load((ROOT / "configs" / "serve" / "canary.yaml").read_text())
    path = tmp_path / "canary.yaml"

    def check(repository: Path) -> list[str]:
        config["applications"][0]["args"]["model_repository"] = str(repository)
        path.write_text(yaml.safe_dump(config))
        return check_serve_config(path)

    assert check(root) == []
    only_v1 = tmp_path / "only-v1"
    shutil.copytree(root, only_v1, ignore=lambda _, names: [n for n in names if n == "2"])
    problems = check(only_v1)  # no candidates: both rollouts refused, naming the field
    assert len(problems) == 2, problems
    assert problems[0].endswith("user_config.models.risk_mlp.traffic: model 'risk_mlp' has "
                                "no version ['2'] (versions: ['1'])"), problems
    assert problems[1].endswith("(risk_gbdt).user_config.shadow.version: model 'risk_gbdt' "
                                "has no version '2' (versions: ['1'])"), problems


def test_the_canary_config_is_serve_config_with_two_rollouts_and_the_fleet() -> None:
    """configs/serve/canary.yaml differs from serve_config.yaml only in the rollout fields
    and the tenant fleet: an edit to one without the other fails here."""
    import yaml

    base = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    canary = yaml.safe_load((ROOT / "configs" / "serve" / "canary.yaml").read_text())

    def deployment(config: dict[str, object], name: str) -> dict[str, object]:
        app = config["applications"][0]  # type: ignore[index]
        return next(d for d in app["deployments"] if d["name"] == name)  # type: ignore[no-any-return]

    mlp = deployment(canary, "Ingress")["user_config"]["models"]["risk_mlp"]  # type: ignore[index]
    gbdt = deployment(canary, "risk_gbdt")["user_config"]  # type: ignore[index]
    assert mlp.pop("traffic") == {"1": 90, "2": 10}
    assert gbdt.pop("shadow") == {"version": "2", "fraction": 0.5}
    assert gbdt["version"] == "1"
    mlp["version"] = "1"  # what serve_config.yaml pins
    app = canary["applications"][0]
    assert app["args"].pop("fleets") == {
        "TenantFleet": {"directory": "tenants", "max_models_per_replica": 10}}
    fleet = deployment(canary, "TenantFleet")
    app["deployments"].remove(fleet)
    assert fleet["user_config"] == {"runtime": {"intra_op_num_threads": 1}}
    assert canary == base


# --- the demo fleet ---------------------------------------------------------------------


def test_the_fleet_is_one_distinct_small_model_per_tenant(
        tmp_path: Path, small_dataset: Dataset) -> None:
    root = tmp_path / "models"
    built = build_fleet(root, config=SMALL, size=4)
    names = [tenant_name(i) for i in range(4)]
    assert [(b.name, b.version, b.skipped) for b in built] == [(n, "1", False) for n in names]
    directory = root / FLEET_DIRECTORY
    assert ModelRepository(directory).model_names() == names
    assert ModelRepository(root).model_names() == []  # a fleet is not a top-level model
    x = training_matrix(small_dataset)[0][:256].astype(np.float32)
    answers = []
    for model in built:
        assert model.metrics["auc"] > 0.7, model
        spec = ModelRepository(directory).spec(model.name, "1")
        assert spec.labels["built_by"] == "keel prepare (fleet)"
        session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
        answers.append(session.run(["probabilities"], {"features": x})[0])
    for a, b in itertools.pairwise(answers):
        assert np.abs(a - b).max() > 1e-3  # each tenant its own model
    again = build_fleet(root, config=SMALL, size=4)
    assert all(b.skipped for b in again)
    bigger = build_fleet(root, config=SMALL, size=5)  # another fleet: built again
    assert [b.skipped for b in bigger] == [False] * 5
    with pytest.raises(ValueError, match="fleet size 0"):
        build_fleet(root, config=SMALL, size=0)


def test_every_model_records_its_training_deciles(repo: tuple[Path, list[BuiltModel]],
                                                  small_dataset: Dataset) -> None:
    """model.yaml's ``reference``: per feature, decile edges of the training rows and the
    share of training rows in each bin (the drift monitor's baseline)."""
    from deployments.ingress.rollout.drift import psi

    root, built = repo
    repository = ModelRepository(root)
    x = training_matrix(small_dataset)[0]
    for model in built:
        reference = repository.spec(model.name, model.version).reference["features"]
        assert list(reference) == FEATURE_REFS
        for j, column in enumerate(FEATURE_REFS):
            bins = reference[column]
            assert len(bins.edges) <= 9 and abs(sum(bins.shares) - 1) < 1e-3
            assert psi(bins, x[:, j]) < 0.05  # the whole matrix looks like its training split
    deciles = repository.spec("risk_mlp", "1").reference["features"]["market_features:ret_1d"]
    assert len(deciles.edges) == 9 and max(deciles.shares) < 0.15  # a continuous column
