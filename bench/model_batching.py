"""What micro-batching buys inside one model replica, without any HTTP or Ray hop.

For each model of the repository: answer N single-row requests one ONNX Runtime call
each (what a replica does with max_batch_size 1) and stacked into batches of B
(what ``OnnxRunner.predict_batch`` does with a full ``@serve.batch``), and report
rows/s and the gain. Medians over --repeats. Writes the figures as JSON (``--out``, or
``bench/results/<timestamp>-model-batching.json``) and a PNG beside it.

    .venv/bin/python -m bench.model_batching --repository models
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness.progress import Progress, log
from bench.harness.report import RESULTS_DIR, plot_bars, rel, stamped_paths
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
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repository", default="models")
    parser.add_argument("--requests", type=int, default=4096)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the figures as JSON here (default: "
                        "bench/results/<timestamp>-model-batching.json)")
    args = parser.parse_args(argv)

    repository = ModelRepository(args.repository)
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {}
    print("| model | " + " | ".join(f"rows/s at batch {b}" for b in args.batches)
          + " | gain at the largest batch |")
    print("|---|" + "---:|" * (len(args.batches) + 1))
    names = repository.model_names()
    progress = Progress("model_batching", len(names) * len(args.batches) * args.repeats,
                        unit="timed runs")
    with progress:
        for name in names:
            measure_model(repository, name, args, rng, report, progress)
    out = Path(args.out) if args.out else stamped_paths(RESULTS_DIR, "model-batching")[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot_bars([f"batch {b}" for b in args.batches],
              {name: [figures["rows_per_s"][b] for b in args.batches]
               for name, figures in report.items()},
              out.with_suffix(".png"), "rows/s inside one model replica, one ONNX Runtime "
              f"call per batch (median of {args.repeats})", ylabel="rows/s (log)", log_y=True)
    log(f"wrote {rel(out)} and {rel(out.with_suffix('.png'))}")
    return 0


def measure_model(repository: ModelRepository, name: str, args: argparse.Namespace,
                  rng: np.random.Generator, report: dict[str, Any],
                  progress: Progress) -> None:
    """One model: rows/s per batch size (medians), its row of the table, its report."""
    runner = load_runner(repository, name, None, RuntimeOptions())
    width = runner.spec.inputs[0].shape[-1]
    requests = [{"features": rng.normal(size=(1, width)).astype(np.float32)}
                for _ in range(args.requests)]
    rows_per_second(runner, requests[:256], max(args.batches))  # warm-up
    medians = {}
    for batch in args.batches:
        runs = []
        for _ in range(args.repeats):
            progress.step(f"{name} batch {batch}")
            runs.append(rows_per_second(runner, requests, batch))
            progress.advance(f"{name} batch {batch}")
        medians[batch] = statistics.median(runs)
    gain = medians[max(args.batches)] / medians[1] if 1 in medians else None
    report[name] = {"rows_per_s": medians, "gain": gain,
                    "batch_invariant": runner.spec.batch_invariant}
    cells = " | ".join(f"{medians[b]:,.0f}" for b in args.batches)
    print(f"| {name} | {cells} | {gain:.1f}x |" if gain else f"| {name} | {cells} | - |")


if __name__ == "__main__":
    raise SystemExit(main())
