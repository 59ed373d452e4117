"""The naive Ray Serve app, as written from Ray's docs with Ray's defaults.

One ``@serve.deployment`` with a FastAPI ingress (``@serve.ingress(app)``) that
holds the ONNX Runtime session and answers the Open Inference Protocol route
once per request: default ``max_ongoing_requests``, one replica, no batching,
no environment tuning. Started with ``serve.run`` in its own process (its own
local Ray instance, see ``raydriver``) on its own port.

    .venv/bin/python bench/naive_serve.py --model risk_mlp --port 8300
"""

# No `from __future__ import annotations`: FastAPI reads the route's annotations in the
# replica, where this module's names (pickled by value by Ray) cannot be looked up by string.
import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from baseline_fastapi import latest_model_file
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from ray import serve
from raydriver import serve_until_stopped, start_local_ray

OIP_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64",
             "tensor(int32)": "INT32", "tensor(bool)": "BOOL", "tensor(string)": "BYTES"}
NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferenceRequest(BaseModel):
    id: str | None = None
    inputs: list[RequestInput]


app = FastAPI(title="naive-serve")


@serve.deployment
@serve.ingress(app)
class OnnxService:
    """One replica, one session, one ``session.run`` per request."""

    def __init__(self, model_name: str, model_file: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # as in Keel's replicas and the baseline
        self.session = ort.InferenceSession(model_file, options,
                                            providers=["CPUExecutionProvider"])
        self.model_name = model_name
        self.version = Path(model_file).parent.name
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.outputs = [(o.name, OIP_TYPES.get(o.type, "BYTES"))
                        for o in self.session.get_outputs()]

    @app.get("/v2/health/ready")
    async def ready(self) -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: InferenceRequest) -> dict[str, Any]:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Naive Ray Serve ONNX app for bench")
    parser.add_argument("--model", default="risk_mlp")
    parser.add_argument("--repository", default="models")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--temp-dir", default=None, help="Ray temp dir (default: a new one)")
    parser.add_argument("--dashboard-port", type=int, default=None,
                        help="start Ray's dashboard on this port")
    args = parser.parse_args(argv)
    model_file = latest_model_file(args.repository, args.model).resolve()
    temp_dir = Path(args.temp_dir or tempfile.mkdtemp(prefix="kb-"))
    start_local_ray(str(temp_dir / "ray"), args.dashboard_port)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(OnnxService.bind(args.model, str(model_file)), name="naive", route_prefix="/")
    serve_until_stopped()
    return 0


if __name__ == "__main__":
    sys.exit(main())
