"""Side-by-side benchmark: Keel against a plain FastAPI server and a naive Ray Serve app.

For each repeat, for each target: start the server in its own process group,
wait for ``GET /v2/health/ready`` to answer 200 and one inference to succeed,
sweep the concurrencies with the closed-loop load generator (``harness.http_load``),
read Keel's batch sizes, stop the server completely, go on to the next target.
Targets are interleaved per repeat so slow drift on the machine spreads over all
of them. Writes ``bench/results/<timestamp>.json`` (every run's figures and the
medians), ``<timestamp>.png`` (rps and p95 against concurrency) and prints a
markdown table of the medians.

    .venv/bin/python -m bench.serving_core                   # the full default run
    .venv/bin/python -m bench.serving_core --duration 3 --warmup 1 --repeats 1 \
        --concurrency 1 8 --targets keel baseline_fastapi    # a quick check
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bench.harness import options, report
from bench.harness.http_load import install_fast_loop, make_bodies
from bench.harness.progress import Progress, log
from bench.harness.report import (
    RunDocument,
    environment,
    fmt,
    median_table,
    ratio_table,
    rel,
    run_interruptibly,
    stamped_paths,
)
from bench.harness.servers import (
    TARGETS,
    Server,
    Target,
    new_run,
    serving,
)
from bench.harness.statistics import median_rows, ratios_against
from bench.harness.sweep import sweep

DEFAULT_TARGETS = ["keel", "keel_tp", "keel_tp_direct", "keel_haproxy", "baseline_fastapi",
                   "naive_serve"]
REFERENCES = ["baseline_fastapi", "naive_serve", "keel_haproxy_nobatch"]
METRICS = ["rps", "p50_ms", "p95_ms", "p99_ms", "error_rate"]


def run_target(target: Target, repeat: int, args: argparse.Namespace, bodies: list[bytes],
               logs_dir: Path, progress: Progress) -> dict[str, Any]:
    """Start one target, sweep the concurrencies, stop it; everything it measured."""
    run = new_run("target", target.name, repeat)
    server = Server(target, args, logs_dir / f"{target.name}-r{repeat}.log")
    label = f"{target.name} r{repeat}"
    progress.step(f"{label} starting")
    with serving(server, run, logs_dir, label, probe=bodies[0],
                 startup_timeout=args.startup_timeout):
        sweep(server, run, args, bodies, label, progress)
    done = len(run["points"])
    if done < len(args.concurrency):  # the points a failed server never ran
        for _ in range(len(args.concurrency) - done):
            progress.advance(f"{label} skipped")
    return run


def summarise(runs: list[dict[str, Any]], targets: list[str],
              concurrencies: list[int]) -> dict[str, Any]:
    """Medians per (target, concurrency) over the repeats, and Keel's ratios."""
    # mean_batch is None where no batch was seen (the references), never 0.
    medians = median_rows(runs, "target", targets, concurrencies, [*METRICS, "mean_batch"])
    ratios = {f"{keel}/{reference}": ratios_against(medians, keel, reference)
              for keel in targets if TARGETS[keel].kind == "keel"
              for reference in REFERENCES if reference in targets and reference != keel}
    return {"medians": medians, "ratios": ratios}


def markdown(summary: dict[str, Any], targets: list[str], concurrencies: list[int]) -> str:
    """The medians (and Keel's ratios) as markdown tables."""

    lines = median_table(
        summary["medians"], targets, concurrencies,
        ["target", "concurrency", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch"],
        lambda row: [fmt(row["rps"], 0), fmt(row["p50_ms"]), fmt(row["p95_ms"]),
                     fmt(row["p99_ms"]), str(row["errors"]), fmt(row["mean_batch"])])
    if summary["ratios"]:
        lines += ["", *ratio_table(summary["ratios"])]
    return "\n".join(lines)



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = options.parser(
        "Keel vs a plain FastAPI server vs a naive Ray Serve app, side by side.",
        epilog="targets: " + "; ".join(f"{t.name}: {t.description}" for t in TARGETS.values()))
    parser.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS, choices=list(TARGETS),
                        metavar="TARGET", help="which targets to run, in this order")
    options.add_sweep(parser, concurrency=[1, 8, 32, 64], duration=10.0)
    options.add_servers(parser, pool=True,
                        repository="model repository of the reference targets (Keel reads "
                                   "the one in its config)",
                        config="Keel's serve config (its HTTP port is replaced)")
    return options.finish(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = args.repository / args.model
    if not model_dir.is_dir():
        log(f"{model_dir} does not exist: run `.venv/bin/keel prepare` first")
        return 2
    install_fast_loop()
    json_path, logs_dir = stamped_paths(args.out, "")
    logs_dir.mkdir(parents=True)
    bodies = make_bodies(pool=args.pool, seed=args.seed)
    document = RunDocument(
        json_path, args, lambda d: summarise(d["runs"], args.targets, args.concurrency),
        targets={n: TARGETS[n].description for n in args.targets},
        environment=environment())

    def measure() -> None:
        total = args.repeats * len(args.targets) * len(args.concurrency)
        with Progress("serving_core", total) as progress:
            for repeat in range(1, args.repeats + 1):
                for name in args.targets:
                    document["runs"].append(run_target(TARGETS[name], repeat, args, bodies,
                                                       logs_dir, progress))
                    document.save()  # partial results survive an interrupted run

    interrupted = run_interruptibly(measure)
    document.save()
    png_path = json_path.with_suffix(".png")
    title = (f"{args.model}, {os.cpu_count()} CPUs shared by server and load generator, "
             f"{args.duration:g} s per point, median of {args.repeats}")
    report.plot_sweep(document.data, args.targets, png_path, title,
               style=lambda name: "-" if TARGETS[name].kind == "keel" else "--")
    print(markdown(document.data, args.targets, args.concurrency))
    log(f"wrote {rel(json_path)} and {rel(png_path)} in {document['elapsed_s']} s; "
        f"server logs in {rel(logs_dir)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
