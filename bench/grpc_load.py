"""Closed-loop OIP gRPC load (``ModelInfer``) against one server, on its own.

The loop, the request builders and the figures are ``bench.harness.grpc_load``'s (the
``peers`` scenario's gRPC points use them too); this prints one ``LoadResult`` per
concurrency as JSON on stdout.

    .venv/bin/python -m bench.grpc_load 127.0.0.1:9000 --model risk_mlp -c 1 8 \\
        --rows 1 --duration 10 --warmup 2
"""

from __future__ import annotations

import argparse
import asyncio

from bench.harness.grpc_load import requests_from_bodies, run_grpc_load
from bench.harness.http_load import install_fast_loop, make_row_bodies, print_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("target", help="host:port of the gRPC server, e.g. 127.0.0.1:9000")
    parser.add_argument("--model", default="risk_mlp")
    parser.add_argument("--concurrency", "-c", type=int, nargs="+", default=[8],
                        help="closed-loop workers; several values run one after another")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--channels", type=int, default=4,
                        help="gRPC channels (HTTP/2 connections), at most one per worker")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--pool", type=int, default=512, help="distinct requests")
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--timeout", type=float, default=30.0, help="per-call timeout, s")
    parser.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE",
                        help="gRPC metadata on every call (e.g. application=keel)")
    args = parser.parse_args(argv)
    install_fast_loop()
    requests = requests_from_bodies(make_row_bodies(args.pool, args.rows, seed=args.seed),
                                    args.model)
    metadata = [(key, value) for key, _, value in (m.partition("=") for m in args.metadata)]
    print_results([asyncio.run(run_grpc_load(
        args.target, concurrency, args.duration, args.warmup, requests, args.timeout,
        model=args.model, channels=args.channels, metadata=metadata)).to_dict()
        for concurrency in args.concurrency])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
