"""The peer servers of the ``peers`` scenario: KServe's python ModelServer and MLServer, each
serving ``risk_mlp`` over ONNX Runtime on the Open Inference Protocol (V2) REST route
``POST /v2/models/<name>/infer``.

Both conflict with Keel's dependencies, so each runs from its own virtual environment
(``bench/.venvs/<name>``, made by ``ensure_venv`` on first use). This module is used
from both sides:

- ``bench.peers`` (Keel's venv) imports it for what each peer needs: its pinned
  requirements (``venvs``), its venv, its command line and its config files;
- the peer's own interpreter runs it, from the repository root:
  ``bench/.venvs/kserve/bin/python -m bench.harness.peer_servers kserve --model-file ...
  --http_port ...`` starts KServe's ``ModelServer`` (KServe's own
  flags: ``--http_port``, ``--grpc_port``, ``--workers``, ...); MLServer is started by its
  own CLI, ``mlserver start DIR``, on the ``settings.json`` and ``model-settings.json``
  that ``write_mlserver_config`` writes, whose ``implementation`` is
  ``bench.harness.peer_servers.MLServerOnnxModel`` (the repository root on ``PYTHONPATH``;
  ``bench`` and ``bench.harness`` import nothing, so the peer's venv needs none of Keel's
  dependencies).

Only the standard library is imported at module level. The two model classes subclass
their framework's base class, which only exists in that framework's venv, so they are
built on first access by the module's ``__getattr__`` (PEP 562) and cached: the
frameworks find them by name (MLServer imports ``MLServerOnnxModel`` from here; KServe's
``--workers N`` spawns processes that unpickle the model by ``module.class``), and a
name always gives the same class object, as pickle checks.

Both models do what ``baseline_fastapi`` does per call: one ``InferenceSession``
(``intra_op_num_threads=1``) loaded at start-up, one ``session.run`` per request (per
batch, for MLServer's adaptive batching), the framework's own request and response
types and codecs.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What the ORT output types are called in the Open Inference Protocol.
OIP_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64",
             "tensor(int32)": "INT32", "tensor(bool)": "BOOL"}

#: Where ``ensure_venv`` records what a venv was made with (and reuses it when equal).
MARKER = "keel-bench-venv.json"


# --------------------------------------------------------------------------- venvs


@dataclass(frozen=True)
class PeerVenv:
    """One peer's virtual environment: what pip installs into it."""

    name: str
    requirements: tuple[str, ...]
    #: Distributions whose installed versions the benchmark reports.
    report: tuple[str, ...]


def venvs(onnxruntime_version: str) -> dict[str, PeerVenv]:
    """The peers' venvs, with ONNX Runtime pinned to Keel's version (the same kernels)."""
    ort = f"onnxruntime=={onnxruntime_version}"
    return {v.name: v for v in [
        PeerVenv("kserve", ("kserve==0.21.*", ort, "numpy"),
                 ("kserve", "onnxruntime", "numpy", "fastapi", "uvicorn", "uvloop")),
        # uvloop 0.22 made asyncio.get_event_loop() raise where no loop runs, which kills
        # MLServer 1.7.1's inference workers at start (SeldonIO/MLServer issue 2286).
        PeerVenv("mlserver", ("mlserver==1.7.*", ort, "numpy", "uvloop<0.22"),
                 ("mlserver", "onnxruntime", "numpy", "fastapi", "uvicorn", "uvloop")),
    ]}


def venv_python(root: Path) -> Path:
    return root / "bin" / "python"


def installed_versions(root: Path, names: tuple[str, ...]) -> dict[str, str | None]:
    """``name -> version`` of the distributions installed in the venv at ``root``."""
    script = ("import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\n"
              "out = {}\nfor n in sys.argv[1:]:\n    try:\n        out[n] = version(n)\n"
              "    except PackageNotFoundError:\n        out[n] = None\nprint(json.dumps(out))")
    text = subprocess.run([str(venv_python(root)), "-c", script, *names], check=True,
                          capture_output=True, text=True, timeout=120).stdout
    found: dict[str, str | None] = json.loads(text)
    return found


def ensure_venv(spec: PeerVenv, root: Path, base_python: str, log_path: Path, *,
                reinstall: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The venv at ``root`` with ``spec.requirements`` installed: reused when its marker
    says it was made with the same requirements and interpreter, else made anew
    (``python -m venv`` + ``pip install``; pip's output goes to ``log_path``).
    Returns the marker: requirements, interpreter, installed versions."""
    wanted: dict[str, Any] = {"requirements": list(spec.requirements),
                              "base_python": base_python}
    marker = root / MARKER
    if not reinstall and marker.is_file() and venv_python(root).exists():
        existing: dict[str, Any] = json.loads(marker.read_text())
        if {k: existing.get(k) for k in wanted} == wanted:
            existing["reused"] = True
            return existing
    log(f"creating {root} ({' '.join(spec.requirements)}); pip output in {log_path}")
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        for argv in ([base_python, "-m", "venv", str(root)],
                     [str(venv_python(root)), "-m", "pip", "install", "--disable-pip-version-check",
                      *spec.requirements]):
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=1800,
                                  check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[:4])}... exited with {done.returncode}; "
                                   f"see {log_path}")
    document: dict[str, Any] = {**wanted, "versions": installed_versions(root, spec.report)}
    marker.write_text(json.dumps(document, indent=2) + "\n")
    document["reused"] = False
    return document


# --------------------------------------------------------------------------- commands


def kserve_argv(root: Path, model_name: str, model_file: Path, port: int, grpc_port: int,
                workers: int) -> list[str]:
    """KServe's ModelServer on ``port`` (its gRPC server, on by default, on ``grpc_port``)."""
    return [str(venv_python(root)), "-m", "bench.harness.peer_servers", "kserve",
            "--model_name", model_name, "--model-file", str(model_file),
            "--http_port", str(port), "--grpc_port", str(grpc_port), "--workers", str(workers)]


def write_mlserver_config(into: Path, model_name: str, model_file: Path, port: int,
                          grpc_port: int, metrics_port: int, max_batch_size: int,
                          max_batch_time_s: float) -> Path:
    """MLServer's ``settings.json`` and ``<model>/model-settings.json`` under ``into``
    (MLServer's defaults otherwise); returns the folder ``mlserver start`` is given."""
    into.mkdir(parents=True, exist_ok=True)
    settings = {
        "host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        # Its working files, which default to the current directory (the repository).
        "metrics_dir": str(into / ".metrics"), "environments_dir": str(into / ".envs"),
    }
    (into / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    model_dir = into / model_name
    model_dir.mkdir(exist_ok=True)
    model_settings = {
        "name": model_name,
        "implementation": "bench.harness.peer_servers.MLServerOnnxModel",
        # Adaptive batching: up to max_batch_size requests, waiting at most max_batch_time.
        "max_batch_size": max_batch_size,
        "max_batch_time": max_batch_time_s,
        "parameters": {"uri": str(model_file), "version": model_file.parent.name},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2) + "\n")
    return into


def mlserver_argv(root: Path, folder: Path) -> list[str]:
    return [str(root / "bin" / "mlserver"), "start", str(folder)]


# --------------------------------------------------------------------------- the model


class OnnxSession:
    """One ONNX Runtime session over one model file, as every server under test runs it.

    Picklable (KServe's ``--workers`` spawns processes and pickles the model into
    them): it pickles as its file path and loads the session again on the other side.
    """

    def __init__(self, model_file: str | Path) -> None:
        self.model_file = str(model_file)
        self._load()

    def _load(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(self.model_file, options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.outputs = [(o.name, OIP_TYPES.get(o.type, "BYTES"))
                        for o in self.session.get_outputs()]

    def run(self, features: Any) -> list[Any]:
        values: list[Any] = self.session.run(None, {self.input_name: features})
        return values

    def __getstate__(self) -> dict[str, str]:
        return {"model_file": self.model_file}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.model_file = state["model_file"]
        self._load()


def _kserve_model_class() -> type:
    """``KServeOnnxModel(kserve.Model)``: V2 ``InferRequest`` in, ``InferResponse`` out."""
    import numpy as np
    from kserve import InferOutput, InferRequest, InferResponse, Model
    from kserve.errors import InvalidInput
    from kserve.utils.utils import generate_uuid

    class KServeOnnxModel(Model):
        def __init__(self, name: str, model_file: str) -> None:
            super().__init__(name)
            self.model_file = model_file
            self.version = Path(model_file).parent.name
            self.onnx: OnnxSession | None = None

        def load(self) -> bool:
            self.onnx = OnnxSession(self.model_file)
            self.ready = True
            return bool(self.ready)

        def predict(self, payload: InferRequest, headers: dict[str, str] | None = None
                    ) -> InferResponse:
            assert self.onnx is not None
            item = payload.get_input_by_name(self.onnx.input_name)
            if item is None:
                raise InvalidInput(f"expected an input named {self.onnx.input_name!r}")
            features = item.as_numpy().astype(np.float32, copy=False)
            outputs = [InferOutput(name=name, shape=list(value.shape), datatype=datatype,
                                   data=value)
                       for (name, datatype), value in zip(self.onnx.outputs,
                                                          self.onnx.run(features), strict=True)]
            # As KServe's own servers do: the request's id, or a new one.
            return InferResponse(response_id=payload.id or generate_uuid(),
                                 model_name=self.name,
                                 model_version=self.version, infer_outputs=outputs)

    return KServeOnnxModel


def _mlserver_model_class() -> type:
    """``MLServerOnnxModel(mlserver.MLModel)``: ``NumpyCodec`` in and out."""
    import numpy as np
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.errors import MLServerError
    from mlserver.types import InferenceRequest, InferenceResponse

    class MLServerOnnxModel(MLModel):
        async def load(self) -> bool:
            self.onnx = OnnxSession(self.settings.parameters.uri)
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            item = next((i for i in payload.inputs if i.name == self.onnx.input_name), None)
            if item is None:
                raise MLServerError(f"expected an input named {self.onnx.input_name!r}",
                                    status_code=400)
            features = NumpyCodec.decode_input(item).astype(np.float32, copy=False)
            values = self.onnx.run(features)
            return InferenceResponse(
                id=payload.id, model_name=self.name, model_version=self.version,
                outputs=[NumpyCodec.encode_output(name, value)
                         for (name, _), value in zip(self.onnx.outputs, values, strict=True)])

    return MLServerOnnxModel


_FACTORIES = {"KServeOnnxModel": _kserve_model_class, "MLServerOnnxModel": _mlserver_model_class}


@functools.cache
def _model_class(name: str) -> type:
    cls = _FACTORIES[name]()
    # Found by pickle and import strings as this module's attribute (see the docstring).
    cls.__module__ = __name__
    cls.__qualname__ = name
    return cls


def __getattr__(name: str) -> Any:
    if name in _FACTORIES:
        return _model_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- servers


def serve_kserve(argv: list[str]) -> int:
    """KServe's ModelServer with one ``KServeOnnxModel``, parsed by KServe's own flags."""
    from kserve import ModelServer
    from kserve import model_server as kserve_server

    parser = argparse.ArgumentParser(parents=[kserve_server.parser],
                                     description="KServe ModelServer over ONNX Runtime")
    parser.add_argument("--model-file", required=True)
    args = parser.parse_args(argv)
    model = _model_class("KServeOnnxModel")(args.model_name, args.model_file)
    model.load()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port,
                workers=args.workers).start([model])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "kserve":
        print("usage: python -m bench.harness.peer_servers kserve --model_name NAME "
              "--model-file FILE [KServe ModelServer flags]\n(MLServer: `mlserver start "
              "DIR` on the files write_mlserver_config writes)", file=sys.stderr)
        return 2
    # KServe's model_server also parses sys.argv when imported (parse_known_args): the
    # flags given here are KServe's own, so both parses agree.
    return serve_kserve(argv[1:])


if __name__ == "__main__":
    # Run as the module of that name (not as __main__), so the model class is
    # bench.harness.peer_servers.KServeOnnxModel wherever KServe's --workers unpickle it.
    from bench.harness import peer_servers

    sys.exit(peer_servers.main())
