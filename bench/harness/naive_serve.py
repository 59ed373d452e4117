"""The naive Ray Serve app, as written from Ray's docs with Ray's defaults.

One ``@serve.deployment`` with a FastAPI ingress (``@serve.ingress(app)``) that
holds the ONNX Runtime session and answers the Open Inference Protocol route
once per request: default ``max_ongoing_requests``, one replica, no batching,
no environment tuning. Started with ``serve.run`` in its own process (its own
local Ray instance, see ``local_ray``) on its own port.

    .venv/bin/python -m bench.harness.naive_serve --model risk_mlp --port 8300
"""

# No `from __future__ import annotations`: FastAPI reads the route's annotations in the
# replica, where this module's names (pickled by value by Ray) cannot be looked up by string.
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.serve import Deployment

from bench.harness.baseline_fastapi import (
    InferenceRequest,
    PlainOnnxModel,
    latest_model_file,
    server_parser,
)
from bench.harness.local_ray import serve_until_stopped, start_local_ray
from bench.harness.report import REPO_ROOT

app = FastAPI(title="naive-serve")


@serve.deployment
@serve.ingress(app)
class OnnxService:
    """One replica, one session, one ``session.run`` per request (as the baseline)."""

    def __init__(self, model_name: str, model_file: str) -> None:
        self.model = PlainOnnxModel(model_name, Path(model_file))

    @app.get("/v2/health/ready")
    async def ready(self) -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: InferenceRequest) -> dict[str, Any]:
        return self.model.answer(name, request)


def main(argv: list[str] | None = None) -> int:
    parser = server_parser("Naive Ray Serve ONNX app for bench", 8300)
    parser.add_argument("--temp-dir", default=None, help="Ray temp dir (default: a new one)")
    parser.add_argument("--dashboard-port", type=int, default=None,
                        help="start Ray's dashboard on this port")
    args = parser.parse_args(argv)
    model_file = latest_model_file(args.repository, args.model).resolve()
    temp_dir = Path(args.temp_dir or tempfile.mkdtemp(prefix="kb-"))
    # The replica imports bench.harness.baseline_fastapi (PlainOnnxModel) from the repository.
    start_local_ray(str(temp_dir / "ray"), args.dashboard_port, python_path=str(REPO_ROOT))
    serve.start(http_options={"host": args.host, "port": args.port})
    # @serve.deployment returns a Deployment; Ray's stubs type it as the class.
    serve.run(cast(Deployment, OnnxService).bind(args.model, str(model_file)), name="naive",
              route_prefix="/")
    serve_until_stopped()
    return 0


if __name__ == "__main__":
    sys.exit(main())
