"""The command-line options the scenarios share (same names and defaults in each)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.harness.report import REPO_ROOT, RESULTS_DIR


def parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A scenario's parser: defaults shown in ``--help``."""
    return argparse.ArgumentParser(description=description, epilog=epilog,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_sweep(parser: argparse.ArgumentParser, *, concurrency: list[int] | None,
              duration: float, repeats: int = 3) -> None:
    """``--concurrency`` (when given a default), ``--duration``, ``--warmup``, ``--repeats``."""
    if concurrency is not None:
        parser.add_argument("--concurrency", nargs="+", type=int, default=concurrency,
                            help="closed-loop clients per point")
    parser.add_argument("--duration", type=float, default=duration, help="measured s per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured s per point")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="whole sweeps; medians over them")


def add_servers(parser: argparse.ArgumentParser, *, pool: bool = False,
                repository: str = "model repository of the servers that are not Keel (Keel "
                                  "reads the one in its config)",
                config: str = "Keel's serve config (its ports replaced)") -> None:
    """What the servers are started with and how long to wait for them: ``--model``,
    ``--repository``, ``--config``, ``--pool`` (with ``pool``), ``--seed``,
    ``--request-timeout``, ``--startup-timeout``, ``--dashboard``, ``--out``."""
    parser.add_argument("--model", default="risk_mlp", help="model to send the load to")
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "models", help=repository)
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "serve_config.yaml",
                        help=config)
    if pool:
        parser.add_argument("--pool", type=int, default=512, help="distinct request rows")
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--request-timeout", type=float, default=30.0, help="per request, s")
    parser.add_argument("--startup-timeout", type=float, default=240.0,
                        help="s to wait for a server to be ready")
    parser.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True,
                        help="start Ray's dashboard with the Ray servers, as `serve run` does")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="where the JSON, the PNG and the server logs go")


def finish(parser: argparse.ArgumentParser, argv: list[str] | None, *,
           concurrencies: tuple[str, ...] = ("concurrency",)) -> argparse.Namespace:
    """Parse ``argv``; ``--repeats`` and every concurrency must be >= 1; every path option
    becomes absolute (the servers run from the repository root)."""
    args = parser.parse_args(argv)
    counts = [args.repeats] if hasattr(args, "repeats") else []
    for name in concurrencies:
        value = getattr(args, name)
        counts += value if isinstance(value, list) else [value]
    if any(c < 1 for c in counts):
        parser.error("--repeats and concurrencies must be >= 1")
    for key, value in vars(args).items():
        if isinstance(value, Path):
            setattr(args, key, value.resolve())
    return args
