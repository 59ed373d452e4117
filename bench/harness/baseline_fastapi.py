"""The plain baseline: one uvicorn process, FastAPI, one ONNX Runtime session.

What a user writes without a serving framework: load the model at start-up,
parse the Open Inference Protocol JSON with pydantic, run the session once per
request (no batching, no cache), answer OIP JSON. Single worker; uvicorn uses
uvloop/httptools when they are installed, as it does by default.

    .venv/bin/python -m bench.harness.baseline_fastapi --model risk_mlp --port 8100
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

#: ONNX Runtime type strings -> Open Inference Protocol datatypes (the common ones).
OIP_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64",
             "tensor(int32)": "INT32", "tensor(bool)": "BOOL", "tensor(string)": "BYTES"}
NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def latest_model_file(repository: str | Path, name: str) -> Path:
    """``<repository>/<name>/<highest version>/model.onnx`` (integer versions compare as ints)."""
    root = Path(repository) / name
    versions = [p for p in root.iterdir() if (p / "model.onnx").is_file()] \
        if root.is_dir() else []
    if not versions:
        raise SystemExit(f"no {root}/<version>/model.onnx; run `keel prepare` first")

    def order(path: Path) -> tuple[int, int, str]:
        return (1, int(path.name), "") if path.name.isdigit() else (0, 0, path.name)

    return max(versions, key=order) / "model.onnx"


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferenceRequest(BaseModel):
    id: str | None = None
    inputs: list[RequestInput]


class PlainOnnxModel:
    """One session, loaded once, called once per request: the per-request work that the
    baseline and the naive Ray Serve app (naive_serve.py) share, so they differ only in
    how they are served."""

    def __init__(self, model_name: str, model_file: Path) -> None:
        options = ort.SessionOptions()
        # The same as Keel's replicas (serve_config.yaml), so the comparison is about
        # serving, not ONNX Runtime's thread pool spinning on a 2-core machine.
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_file), options,
                                            providers=["CPUExecutionProvider"])
        self.model_name = model_name
        self.version = model_file.parent.name
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.outputs = [(o.name, OIP_TYPES.get(o.type, "BYTES"))
                        for o in self.session.get_outputs()]

    def answer(self, name: str, request: InferenceRequest) -> dict[str, Any]:
        """The Open Inference Protocol answer to one request (HTTPException on bad input)."""
        if name != self.model_name:
            raise HTTPException(404, f"model {name!r} not found")
        feeds = {}
        for item in request.inputs:
            if item.name not in self.input_names or item.datatype not in NUMPY_TYPES:
                raise HTTPException(400, f"unexpected input {item.name!r} ({item.datatype})")
            try:
                array = np.asarray(item.data, dtype=NUMPY_TYPES[item.datatype])
                feeds[item.name] = array.reshape(item.shape)
            except ValueError as exc:
                raise HTTPException(400, f"input {item.name!r}: {exc}") from exc
        try:
            values = self.session.run(None, feeds)
        except Exception as exc:  # ORT raises its own exception types for bad shapes
            raise HTTPException(400, str(exc)) from exc
        return {
            "model_name": self.model_name,
            "model_version": self.version,
            "id": request.id,
            "outputs": [
                {"name": out_name, "datatype": datatype, "shape": list(value.shape),
                 "data": value.ravel().tolist()}
                for (out_name, datatype), value in zip(self.outputs, values, strict=True)
            ],
        }


def create_app(model_name: str, model_file: Path) -> FastAPI:
    """The baseline app: one ``PlainOnnxModel`` in one uvicorn process."""
    model = PlainOnnxModel(model_name, model_file)
    app = FastAPI(title="baseline")

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: InferenceRequest) -> dict[str, Any]:
        return model.answer(name, request)

    return app


def server_parser(description: str, port: int) -> argparse.ArgumentParser:
    """The options this baseline and the naive Ray Serve app share: ``--model``,
    ``--repository``, ``--host``, ``--port``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="risk_mlp")
    parser.add_argument("--repository", default="models")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = server_parser("Plain FastAPI + ONNX Runtime baseline", 8100).parse_args(argv)
    app = create_app(args.model, latest_model_file(args.repository, args.model))
    # uvicorn's defaults otherwise (access log on, as a user would leave it).
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
