"""What micro-batching buys inside one model replica, without any HTTP or Ray hop.

For each model of the repository: answer N single-row requests one ONNX Runtime call
each (what a replica does with max_batch_size 1) and stacked into batches of B
(what ``OnnxRunner.predict_batch`` does with a full ``@serve.batch``), and report
rows/s and the gain. Medians over --repeats.

    .venv/bin/python bench/model_batching.py --repository models
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from deployments.onnx.core import RuntimeOptions, load_runner
from deployments.repository import ModelRepository


def rows_per_second(runner: Any, requests: list[dict[str, np.ndarray]], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(requests), batch):
        chunk = requests[i:i + batch]
        if batch == 1:
            runner.predict(chunk[0])
        else:
            runner.predict_batch(chunk)
    return len(requests) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default="models")
    parser.add_argument("--requests", type=int, default=4096)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    repository = ModelRepository(args.repository)
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {}
    print("| model | " + " | ".join(f"rows/s at batch {b}" for b in args.batches)
          + " | gain at the largest batch |")
    print("|---|" + "---:|" * (len(args.batches) + 1))
    for name in repository.model_names():
        runner = load_runner(repository, name, None, RuntimeOptions())
        width = runner.spec.inputs[0].shape[-1]
        requests = [{"features": rng.normal(size=(1, width)).astype(np.float32)}
                    for _ in range(args.requests)]
        rows_per_second(runner, requests[:256], max(args.batches))  # warm-up
        medians = {}
        for batch in args.batches:
            runs = [rows_per_second(runner, requests, batch) for _ in range(args.repeats)]
            medians[batch] = statistics.median(runs)
        gain = medians[max(args.batches)] / medians[1] if 1 in medians else None
        report[name] = {"rows_per_s": medians, "gain": gain,
                        "batch_invariant": runner.spec.batch_invariant}
        cells = " | ".join(f"{medians[b]:,.0f}" for b in args.batches)
        print(f"| {name} | {cells} | {gain:.1f}x |" if gain else f"| {name} | {cells} | - |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
