"""Build the demo model repository: two FP32 risk models and an INT8 variant.

``build_demo_repository(root)`` trains on :mod:`graph.demo.dataset` and writes

* ``risk_mlp/<version>``      StandardScaler + MLPClassifier(64, 32), exported with skl2onnx;
* ``risk_gbdt/<version>``     GradientBoostingClassifier, exported with skl2onnx;
* ``risk_mlp_int8/<version>`` risk_mlp with its hidden and output dense layers
  dynamically quantised to INT8 by ONNX Runtime;

each as ``model.onnx`` + ``model.yaml``. ``build_fleet(root)`` writes the demo fleet:
50 per-tenant logistic regressions under ``tenants/`` (a multiplexed fleet's
directory, args.fleets). ``build_candidates(root)`` adds version 2 of
``risk_mlp`` (a 32-16 MLP) and ``risk_gbdt`` (150 depth-2 trees), retrained with another
seed: the candidates a canary rolls out (configs/serve/canary.yaml).
Every model takes ``features`` FP32
``[-1, 12]`` (columns :data:`~graph.demo.dataset.FEATURE_REFS`) and returns
``label`` INT64 ``[-1]`` and ``probabilities`` FP32 ``[-1, 2]``. The metrics in
``model.yaml`` come from running the written ONNX files with ONNX Runtime on a
held-out split, so they describe what is served, not what scikit-learn predicted.

The build is idempotent: ``<root>/.demo-build.json`` records a fingerprint of the
inputs; a later call with the same fingerprint whose files all exist returns the
recorded result without touching anything. Every file is written to a temporary
name and renamed into place, and ``model.yaml`` after ``model.onnx``, so a reader
never sees a half-written model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import skl2onnx
import sklearn
from onnxruntime.quantization import QuantType, quantize_dynamic
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from deployments.repository import (
    ColumnBins,
    DecisionRule,
    ModelRepository,
    ModelSpec,
    TensorSpec,
    dump_spec,
)
from graph.demo import Step, quiet
from graph.demo.dataset import FEATURE_REFS, DatasetConfig, generate, training_matrix
from graph.files import exclusive, write_atomic

logger = logging.getLogger(__name__)

#: Bump whenever the builder's output changes for the same inputs: it forces a rebuild.
BUILD_FORMAT = 3
MANIFEST_FILE = ".demo-build.json"
LOCK_FILE = ".demo-build.lock"

MLP = "risk_mlp"
GBDT = "risk_gbdt"
MLP_INT8 = "risk_mlp_int8"
MODEL_NAMES: tuple[str, ...] = (MLP, GBDT, MLP_INT8)

#: The retrained candidates ``keel prepare`` writes beside version 1, for a canary and a
#: shadow (configs/serve/canary.yaml): other hyperparameters and another training seed on
#: the same data. The shipped configs pin version 1, so nothing serves them until asked.
CANDIDATE_VERSION = "2"
CANDIDATE_NAMES: tuple[str, ...] = (MLP, GBDT)
CANDIDATE_MANIFEST_FILE = ".demo-candidates.json"

#: The demo fleet ``keel prepare`` writes under ``<repository>/tenants``: one small
#: per-tenant model each (configs/serve/canary.yaml serves them from one multiplexed
#: deployment, args.fleets).
FLEET_DIRECTORY = "tenants"
FLEET_SIZE = 50
FLEET_MANIFEST_FILE = ".demo-fleet.json"


def tenant_name(index: int) -> str:
    """The demo fleet's ``index``-th model (``tenant_000`` ...)."""
    return f"tenant_{index:03d}"


INPUT_NAME = "features"
N_FEATURES = len(FEATURE_REFS)
#: P(risk event) at or above this is a "yes"; at 0.5 the decision agrees with the
#: model's own ``label`` output.
THRESHOLD = 0.5
HOLDOUT_FRACTION = 0.2
# skl2onnx lowers these to the lowest opsets the graph needs; ONNX Runtime >= 1.20 runs them.
TARGET_OPSET: dict[str, int] = {"": 17, "ai.onnx.ml": 3}
# Ops a dynamically quantised dense layer turns into; counted to prove quantisation happened.
_QUANTIZED_OPS = frozenset({"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm"})
# Same rule as the repository applies to directory names.
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

_INPUTS = [
    TensorSpec(name=INPUT_NAME, datatype="FP32", shape=[-1, N_FEATURES], columns=FEATURE_REFS,
               description="Market features of the symbol, then portfolio features of the "
                           "account."),
]
_OUTPUTS = [
    TensorSpec(name="label", datatype="INT64", shape=[-1],
               description="The more likely class: 1 = risk event."),
    TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2],
               description="P(no risk event), P(risk event)."),
]
_DECISION = DecisionRule(output="probabilities", index=1, threshold=THRESHOLD)


@dataclass(frozen=True)
class BuiltModel:
    """One model version in the repository; ``path`` is its ``model.onnx``."""

    name: str
    version: str
    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    #: True when the recorded build was reused and nothing was written.
    skipped: bool = False


@dataclass
class _Candidate:
    """A trained model's ONNX bytes and the spec fields that describe it."""

    name: str
    onnx_bytes: bytes
    description: str
    labels: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    #: False for the dynamically quantised model: its activation scales follow the batch.
    batch_invariant: bool = True


def build_fingerprint(config: DatasetConfig, version: str, kind: str = "demo") -> str:
    """Hash of everything that determines the build's output (``kind``: the demo models
    or the candidates)."""
    payload = {
        "build_format": BUILD_FORMAT,
        "version": version,
        **({} if kind == "demo" else {"kind": kind}),
        "config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_demo_repository(
    root: Path,
    *,
    config: DatasetConfig = DatasetConfig(),
    version: str = "1",
    force: bool = False,
    step: Step | None = None,
) -> list[BuiltModel]:
    """Train, export and write the demo models under ``root``; reuse a matching build.

    Returns one :class:`BuiltModel` per model, in :data:`MODEL_NAMES` order, with
    ``skipped=True`` when the recorded build was reused. ``force=True`` rebuilds.
    ``step`` is told each step of a build as it starts (``keel prepare`` prints them).
    """
    root = Path(root)
    fingerprint = build_fingerprint(config, _checked(version))
    return _reuse_or_build(root, fingerprint, root / MANIFEST_FILE, MODEL_NAMES, force,
                           lambda: _build(root, config, version, fingerprint, step or quiet))


def build_candidates(
    root: Path,
    *,
    config: DatasetConfig = DatasetConfig(),
    version: str = CANDIDATE_VERSION,
    force: bool = False,
    step: Step | None = None,
) -> list[BuiltModel]:
    """Train the retrained candidates (:data:`CANDIDATE_NAMES`) as ``version`` under
    ``root``, beside the demo models; reuse a matching build (recorded in
    :data:`CANDIDATE_MANIFEST_FILE`), as :func:`build_demo_repository` does."""
    root = Path(root)
    fingerprint = build_fingerprint(config, _checked(version), kind="candidates")
    return _reuse_or_build(
        root, fingerprint, root / CANDIDATE_MANIFEST_FILE, CANDIDATE_NAMES, force,
        lambda: _build_candidates(root, config, version, fingerprint, step or quiet))


def build_fleet(
    root: Path,
    *,
    config: DatasetConfig = DatasetConfig(),
    size: int = FLEET_SIZE,
    force: bool = False,
    step: Step | None = None,
) -> list[BuiltModel]:
    """Train the demo fleet under ``root/tenants``: ``size`` per-tenant logistic
    regressions (:func:`tenant_name`), each fitted on its own sample of the training rows
    with its own regularisation, so each tenant's answers differ. Reuses a matching build
    (recorded in ``tenants/.demo-fleet.json``) as :func:`build_demo_repository` does."""
    if not 1 <= size <= 1000:
        raise ValueError(f"fleet size {size} must be between 1 and 1000")
    directory = Path(root) / FLEET_DIRECTORY
    fingerprint = build_fingerprint(config, "1", kind=f"fleet-{size}")
    names = tuple(tenant_name(i) for i in range(size))
    return _reuse_or_build(
        directory, fingerprint, directory / FLEET_MANIFEST_FILE, names, force,
        lambda: _build_fleet(directory, config, names, fingerprint, step or quiet))


def _build_fleet(directory: Path, config: DatasetConfig, names: tuple[str, ...],
                 fingerprint: str, step: Step) -> list[BuiltModel]:
    started, cpu_started = time.perf_counter(), time.process_time()
    manifest = directory / FLEET_MANIFEST_FILE
    manifest.unlink(missing_ok=True)
    x_train, x_test, y_train, y_test, holdout = _training_split(config, step)
    step(f"training {len(names)} tenant models")
    built = []
    for index, name in enumerate(names):
        rng = np.random.default_rng(config.seed * 1000 + index)
        # A quarter of the training rows (at most 4,000) and a regularisation of its own.
        rows = rng.choice(len(x_train), size=min(4000, max(1, len(x_train) // 4)),
                          replace=False)
        c = float(10.0 ** rng.uniform(-3, 0))
        clf = LogisticRegression(C=c, max_iter=500)
        pipeline = Pipeline([("scale", StandardScaler()), ("lr", clf)])
        pipeline.fit(x_train[rows], y_train[rows])
        candidate = _Candidate(
            name=name, onnx_bytes=_to_onnx(pipeline, clf, name),
            description=(f"Tenant {index}'s risk model: a standardised logistic regression "
                         f"(C={c:.3g}) on market and portfolio features, fitted on its own "
                         f"{len(rows)} training rows."),
            labels={"dataset_seed": str(config.seed), "built_by": "keel prepare (fleet)",
                    "holdout": holdout, "build_fingerprint": fingerprint[:16],
                    "tenant": str(index), "trainer": f"scikit-learn {sklearn.__version__} "
                    f"StandardScaler + LogisticRegression(C={c:.3g}), {len(rows)} rows"},
        )
        _evaluate(candidate, x_test, y_test)
        built.append(_write_version(directory, candidate, "1"))
    _write_manifest(directory, fingerprint, config, "1", built, time.perf_counter() - started,
                    time.process_time() - cpu_started, manifest)
    return built


def _checked(version: str) -> str:
    if not _VERSION.match(version):
        raise ValueError(f"version {version!r} is not a valid model version directory name")
    return version


def _reuse_or_build(root: Path, fingerprint: str, manifest: Path, names: tuple[str, ...],
                    force: bool, build: Callable[[], list[BuiltModel]]) -> list[BuiltModel]:
    """The build recorded in ``manifest`` when it matches ``fingerprint`` (unless
    ``force``), else ``build()`` under the repository's lock."""
    if not force and (recorded := _recorded_build(root, fingerprint, manifest,
                                                  names)) is not None:
        logger.info("%s under %s are up to date (fingerprint %s)", ", ".join(names), root,
                    fingerprint[:12])
        return recorded
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / LOCK_FILE):
        # Another process may have finished the same build while we waited.
        if not force and (recorded := _recorded_build(root, fingerprint, manifest,
                                                      names)) is not None:
            return recorded
        # The matrices are tiny: BLAS threads only add contention. On a loaded
        # 2-core machine the MLP trained 3-12x faster with one thread.
        with threadpool_limits(limits=1):
            return build()


_Split = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any],
               np.ndarray[Any, Any], str]


def _training_split(config: DatasetConfig, step: Step) -> _Split:
    """The demo data set's training and holdout rows (stratified), and the holdout's
    description for the models' labels."""
    step("generating the demo dataset")
    features, labels = training_matrix(generate(config))
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=HOLDOUT_FRACTION, random_state=config.seed, stratify=labels
    )
    holdout = (f"{len(y_test)} rows ({HOLDOUT_FRACTION:.0%}), stratified, "
               f"random_state={config.seed}")
    return x_train, x_test, y_train, y_test, holdout


def _build_candidates(root: Path, config: DatasetConfig, version: str, fingerprint: str,
                      step: Step) -> list[BuiltModel]:
    started, cpu_started = time.perf_counter(), time.process_time()
    manifest = root / CANDIDATE_MANIFEST_FILE
    manifest.unlink(missing_ok=True)
    x_train, x_test, y_train, y_test, holdout = _training_split(config, step)
    seed = config.seed + 1
    common = {"dataset_seed": str(config.seed), "training_seed": str(seed),
              "built_by": "keel prepare (candidate)", "holdout": holdout,
              "build_fingerprint": fingerprint[:16]}
    step(f"training candidate {MLP}/{version}")
    mlp = _train_mlp(x_train, y_train, seed, common, hidden=(32, 16), alpha=1e-3)
    step(f"training candidate {GBDT}/{version}")
    gbdt = _train_gbdt(x_train, y_train, seed, common, n_estimators=150, max_depth=2)
    for candidate in (mlp, gbdt):
        _evaluate(candidate, x_test, y_test)
    step(f"writing {root}")
    reference = training_bins(x_train)
    built = [_write_version(root, candidate, version, reference) for candidate in (mlp, gbdt)]
    _write_manifest(root, fingerprint, config, version, built, time.perf_counter() - started,
                    time.process_time() - cpu_started, manifest)
    return built


def _build(root: Path, config: DatasetConfig, version: str, fingerprint: str,
           step: Step) -> list[BuiltModel]:
    started, cpu_started = time.perf_counter(), time.process_time()
    # A stale manifest must not vouch for files this build is about to replace.
    (root / MANIFEST_FILE).unlink(missing_ok=True)

    x_train, x_test, y_train, y_test, holdout = _training_split(config, step)
    common = {"dataset_seed": str(config.seed), "built_by": "keel prepare",
              "holdout": holdout, "build_fingerprint": fingerprint[:16]}

    step("training risk_mlp")
    mlp = _train_mlp(x_train, y_train, config.seed, common)
    step("training risk_gbdt")
    gbdt = _train_gbdt(x_train, y_train, config.seed, common)
    step("quantising risk_mlp to INT8")
    mlp_int8 = _quantize(mlp, version, common)
    step("evaluating on the holdout")

    fp32_probs = _evaluate(mlp, x_test, y_test)
    _evaluate(gbdt, x_test, y_test)
    int8_probs = _evaluate(mlp_int8, x_test, y_test)
    diff = np.abs(int8_probs - fp32_probs)
    agree = (int8_probs[:, 1] >= THRESHOLD) == (fp32_probs[:, 1] >= THRESHOLD)
    mlp_int8.metrics.update({
        "fp32_auc": mlp.metrics["auc"],
        "fp32_accuracy": mlp.metrics["accuracy"],
        "max_abs_diff_vs_fp32": round(float(diff.max()), 6),
        "agreement_vs_fp32": round(float(agree.mean()), 6),
        "max_abs_diff_row_vs_batch": _batch_dependence(mlp_int8, x_test[:256]),
    })

    step(f"writing {root}")
    reference = training_bins(x_train)
    built = [_write_version(root, candidate, version, reference)
             for candidate in (mlp, gbdt, mlp_int8)]
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    _write_manifest(root, fingerprint, config, version, built, elapsed, cpu)
    logger.info("built %d demo models under %s in %.1f s (%.1f s CPU): %s", len(built), root,
                elapsed, cpu, ", ".join(f"{b.name} auc={b.metrics['auc']:.3f}" for b in built))
    return built


def _train_mlp(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], seed: int,
               common: dict[str, str], *, hidden: tuple[int, int] = (64, 32),
               alpha: float = 1e-4) -> _Candidate:
    clf = MLPClassifier(
        hidden_layer_sizes=hidden,
        activation="relu",
        alpha=alpha,
        batch_size=256,
        learning_rate_init=1e-3,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=15,
        max_iter=300,
        random_state=seed,
    )
    pipeline = Pipeline([("scale", StandardScaler()), ("mlp", clf)])
    started = time.perf_counter()
    pipeline.fit(x, y)
    logger.info("trained %s in %.1f s (%d epochs)", MLP, time.perf_counter() - started,
                clf.n_iter_)
    return _Candidate(
        name=MLP,
        onnx_bytes=_to_onnx(pipeline, clf, MLP),
        description=("Probability that the account has a risk event after trading the symbol: "
                     f"a standardised {hidden[0]}-{hidden[1]} ReLU MLP on market and "
                     "portfolio features."),
        labels={**common, "trainer": f"scikit-learn {sklearn.__version__} "
                f"StandardScaler + MLPClassifier({hidden[0]}, {hidden[1]}, alpha={alpha:g}), "
                f"{clf.n_iter_} epochs"},
    )


def _train_gbdt(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], seed: int,
                common: dict[str, str], *, n_estimators: int = 100,
                max_depth: int = 3) -> _Candidate:
    # HistGradientBoostingClassifier would train faster, but skl2onnx 1.20 fails to
    # convert it under scikit-learn 1.9 (a bool in a TreeEnsemble int attribute).
    clf = GradientBoostingClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                     learning_rate=0.15, subsample=0.5, random_state=seed)
    started = time.perf_counter()
    clf.fit(x, y)
    logger.info("trained %s in %.1f s", GBDT, time.perf_counter() - started)
    return _Candidate(
        name=GBDT,
        onnx_bytes=_to_onnx(clf, clf, GBDT),
        description=("Probability that the account has a risk event after trading the symbol: "
                     f"{n_estimators} gradient-boosted depth-{max_depth} trees on market "
                     "and portfolio features."),
        labels={**common, "trainer": f"scikit-learn {sklearn.__version__} "
                f"GradientBoostingClassifier(n_estimators={n_estimators}, "
                f"max_depth={max_depth}, subsample=0.5)"},
    )


def _to_onnx(model: Any, classifier: Any, name: str) -> bytes:
    """Export with skl2onnx: one FP32 input, ``label`` + ``probabilities`` (no ZipMap)."""
    proto = convert_sklearn(
        model,
        name=name,
        initial_types=[(INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
        # ZipMap would turn probabilities into a list of dicts; keep a tensor.
        options={id(classifier): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    proto.producer_name = f"skl2onnx {skl2onnx.__version__} (keel prepare)"
    return bytes(proto.SerializeToString())


def _quantize(source: _Candidate, version: str, common: dict[str, str]) -> _Candidate:
    """Dynamically quantise the MLP's dense layers to INT8, except the input layer."""
    proto = onnx.load_from_string(source.onnx_bytes)
    initializers = {init.name: init for init in proto.graph.initializer}
    # The input layer sees standardised fat-tailed features (volume, exposure);
    # one per-tensor uint8 range for them cost up to 0.14 in probability here,
    # against 0.03 with that 12x64 layer left in FP32.
    input_layers = [
        node.name for node in proto.graph.node
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in initializers
        and tuple(initializers[node.input[1]].dims)[:1] == (N_FEATURES,)
    ]
    with tempfile.TemporaryDirectory(prefix="keel-quant-") as scratch, _quiet_quantizer():
        fp32_path = Path(scratch) / "fp32.onnx"
        int8_path = Path(scratch) / "int8.onnx"
        fp32_path.write_bytes(source.onnx_bytes)
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=input_layers)
        quantized = onnx.load(str(int8_path))

    n_quantized = sum(1 for node in quantized.graph.node if node.op_type in _QUANTIZED_OPS)
    if n_quantized == 0:
        raise RuntimeError(f"quantize_dynamic left no quantised op in {source.name}")
    quantized.producer_name = f"onnxruntime {ort.__version__} quantize_dynamic (keel prepare)"
    logger.info("quantised %d dense layers of %s to INT8 (%s kept FP32)", n_quantized,
                source.name, ", ".join(input_layers) or "none")
    return _Candidate(
        name=MLP_INT8,
        onnx_bytes=bytes(quantized.SerializeToString()),
        description=(f"{MLP} with its hidden and output dense layers dynamically quantised to "
                     "INT8 (input layer kept FP32); activation scales follow the batch, so "
                     "Keel runs it one row at a time (batch_invariant: false)."),
        batch_invariant=False,
        labels={
            **common,
            "trainer": source.labels["trainer"],
            "quantized_from": f"{MLP}/{version}",
            "quantizer": f"onnxruntime {ort.__version__} quantize_dynamic, weight_type=QInt8",
            "quantized_ops": str(n_quantized),
            "fp32_layers": ", ".join(input_layers),
        },
    )


def _evaluate(candidate: _Candidate, x: np.ndarray[Any, Any],
              y: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Run the ONNX model as served, check its signature, record auc/accuracy."""
    session = _session(candidate)
    _check_signature(candidate.name, session)
    if candidate.batch_invariant:
        probs = session.run(["probabilities"], {INPUT_NAME: x})[0]
    else:
        # Served one row at a time (see ModelSpec.batch_invariant): measure it that way.
        probs = np.concatenate([session.run(["probabilities"], {INPUT_NAME: x[i:i + 1]})[0]
                                for i in range(len(x))])
    probs = np.asarray(probs, dtype=np.float32)
    score = probs[:, _DECISION.index]
    candidate.metrics.update({
        "auc": round(float(roc_auc_score(y, score)), 6),
        "accuracy": round(float(((score >= THRESHOLD) == (y == 1)).mean()), 6),
    })
    return probs


def _batch_dependence(candidate: _Candidate, x: np.ndarray[Any, Any]) -> float:
    """Max |P(row scored alone) - P(row scored in one batch with the others)|.

    Dynamic quantisation picks each activation's scale from the whole batch, so
    an INT8 model's answer for a row moves slightly with its batch neighbours.
    """
    session = _session(candidate)
    batched = session.run(["probabilities"], {INPUT_NAME: x})[0]
    alone = np.concatenate(
        [session.run(["probabilities"], {INPUT_NAME: x[i:i + 1]})[0] for i in range(len(x))]
    )
    return round(float(np.abs(batched - alone).max()), 6)


def _session(candidate: _Candidate) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(candidate.onnx_bytes, options, providers=["CPUExecutionProvider"])


def _check_signature(name: str, session: ort.InferenceSession) -> None:
    """The ONNX inputs/outputs must be what model.yaml will declare."""
    declared = [(t.name, t.datatype, t.shape) for t in (*_INPUTS, *_OUTPUTS)]
    actual = [
        (arg.name, _ORT_DATATYPES.get(arg.type, arg.type),
         [d if isinstance(d, int) else -1 for d in arg.shape])
        for arg in (*session.get_inputs(), *session.get_outputs())
    ]
    if actual != declared:
        raise RuntimeError(f"{name}: ONNX signature {actual} differs from the spec {declared}")


_ORT_DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}


def training_bins(x: np.ndarray[Any, Any], bins: int = 10) -> dict[str, ColumnBins]:
    """Per feature column of the training matrix, its quantile edges (deciles by default;
    repeated edges merged, as for a column of few distinct values) and each bin's share of
    the training rows: the reference the drift monitor compares live inputs with."""
    reference: dict[str, ColumnBins] = {}
    for j, column in enumerate(FEATURE_REFS):
        values = x[:, j].astype(np.float64)
        edges = np.unique(np.quantile(values, np.arange(1, bins) / bins))
        if len(edges) == 0:
            continue
        counts = np.bincount(np.searchsorted(edges, values, side="right"),
                             minlength=len(edges) + 1)
        reference[column] = ColumnBins(edges=[float(e) for e in edges],
                                       shares=[round(float(c) / len(values), 6)
                                               for c in counts])
    return reference


def _write_version(root: Path, candidate: _Candidate, version: str,
                   reference: dict[str, ColumnBins] | None = None) -> BuiltModel:
    spec = ModelSpec(
        name=candidate.name,
        version=version,
        description=candidate.description,
        inputs=_INPUTS,
        outputs=_OUTPUTS,
        decision=_DECISION,
        batch_invariant=candidate.batch_invariant,
        metrics=candidate.metrics,
        labels=candidate.labels,
        reference={INPUT_NAME: reference} if reference else {},
    )
    directory = root / candidate.name / version
    model_path = directory / ModelRepository.MODEL_FILE
    # The spec last: the repository counts a version only once both files exist.
    write_atomic(model_path, candidate.onnx_bytes)
    write_atomic(directory / ModelRepository.SPEC_FILE, dump_spec(spec).encode())
    return BuiltModel(name=candidate.name, version=version, path=model_path,
                      metrics=dict(candidate.metrics))


def _write_manifest(root: Path, fingerprint: str, config: DatasetConfig, version: str,
                    built: list[BuiltModel], seconds: float, cpu_seconds: float,
                    path: Path | None = None) -> None:
    manifest = {
        "build_format": BUILD_FORMAT,
        "fingerprint": fingerprint,
        "version": version,
        "config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
        "build_seconds": round(seconds, 3),
        "build_cpu_seconds": round(cpu_seconds, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": [
            {"name": b.name, "version": b.version,
             "files": [str(b.path.relative_to(root)),
                       str(b.path.with_name(ModelRepository.SPEC_FILE).relative_to(root))],
             "metrics": b.metrics}
            for b in built
        ],
    }
    write_atomic(path or root / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())


def _recorded_build(root: Path, fingerprint: str, path: Path,
                    names: tuple[str, ...]) -> list[BuiltModel] | None:
    """The recorded result when the manifest at ``path`` matches, names ``names`` and all
    its files exist."""
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("fingerprint") != fingerprint:
            return None
        result = []
        for entry in manifest["models"]:
            files = [root / rel for rel in entry["files"]]
            if not all(path.is_file() for path in files):
                return None
            result.append(BuiltModel(
                name=str(entry["name"]), version=str(entry["version"]), path=files[0],
                metrics={str(k): float(v) for k, v in entry["metrics"].items()}, skipped=True,
            ))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # missing or unreadable: build again
    if sorted(b.name for b in result) != sorted(names):
        return None
    return result


class _DropQuantizerChatter(logging.Filter):
    _NOISE = ("pre-processing before quantization", "Quantization parameters for tensor")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self._NOISE)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """quantize_dynamic logs on the root logger on every call: a pre-processing hint
    that does not apply here (the MatMuls are quantised without it) and one line
    per dynamically quantised activation, which is the point of dynamic quantisation."""
    hint_filter = _DropQuantizerChatter()
    root_logger = logging.getLogger()
    root_logger.addFilter(hint_filter)
    try:
        yield
    finally:
        root_logger.removeFilter(hint_filter)


__all__ = [
    "BUILD_FORMAT",
    "CANDIDATE_NAMES",
    "CANDIDATE_VERSION",
    "MODEL_NAMES",
    "BuiltModel",
    "DatasetConfig",
    "build_candidates",
    "build_demo_repository",
    "build_fingerprint",
    "build_fleet",
]
