"""``keel``: the command line (prepare the demo, check a serve config, render manifests)."""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from deployments.errors import KeelError
from graph.config_check import check_serve_config


def _prepare(args: argparse.Namespace) -> int:
    from graph.demo.build import build_candidates, build_demo_repository, build_fleet

    started = time.perf_counter()

    def step(what: str) -> None:
        print(f"  [{time.perf_counter() - started:5.1f} s] {what}", file=sys.stderr, flush=True)

    built = build_demo_repository(Path(args.repository), force=args.force, step=step)
    # The retrained candidates (version 2) that configs/serve/canary.yaml rolls out.
    built += build_candidates(Path(args.repository), force=args.force, step=step)
    # The per-tenant fleet (models/tenants) that configs/serve/canary.yaml multiplexes.
    fleet = build_fleet(Path(args.repository), force=args.force, step=step)
    for model in built:
        state = "up to date" if model.skipped else "built"
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(model.metrics.items()))
        print(f"{model.name}/{model.version}: {state} ({metrics})")
    aucs = [m.metrics["auc"] for m in fleet]
    print(f"fleet tenants: {len(fleet)} models "
          f"{'up to date' if all(m.skipped for m in fleet) else 'built'} "
          f"(auc {min(aucs):.3f}..{max(aucs):.3f})")
    print(f"model repository {args.repository} ready in {time.perf_counter() - started:.1f} s")
    if args.feature_repo:
        started = time.perf_counter()
        # Imports Feast (about 4 s here): only when the feature store is wanted.
        from graph.demo.feast_store import prepare_feature_store

        prepared = prepare_feature_store(args.feature_repo, fs_yaml=args.feature_store_yaml,
                                         force=args.force, step=step)
        print(prepared.describe())
        print(f"feature repository {args.feature_repo} ready in "
              f"{time.perf_counter() - started:.1f} s")
    return 0


def _check(args: argparse.Namespace) -> int:
    problems = check_serve_config(Path(args.config))
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{args.config}: ok")
    return 1 if problems else 0


def _models(args: argparse.Namespace) -> int:
    from deployments.repository import ModelRepository

    repository = ModelRepository(args.repository)
    listing = {name: repository.versions(name) for name in repository.model_names()}
    print(json.dumps(listing, indent=2))
    return 0


def _render_k8s(args: argparse.Namespace) -> int:
    from graph import kube

    root = Path(args.root)
    crd = Path(args.crd) if args.crd else root / kube.DEFAULT_CRD
    files = kube.render(root, crd,
                        serve_config=Path(args.serve_config) if args.serve_config else None,
                        overlay=Path(args.overlay) if args.overlay else None)
    if args.check:
        stale = kube.stale(root, files)
        for name in stale:
            print(f"{name}: differs from a fresh render (run `keel render-k8s`)",
                  file=sys.stderr)
        if not stale:
            print(f"{len(files)} files up to date")
        return 1 if stale else 0
    changed = kube.write(root, files)
    for name in files:
        print(f"{name}: {'written' if name in changed else 'unchanged'}")
    return 0


def _render_cloudwatch(args: argparse.Namespace) -> int:
    from deployments.observability.cloudwatch import CloudWatchConfig, read_config
    from graph import cloudwatch_dashboard as dashboard

    config = read_config() if args.from_env else CloudWatchConfig()
    text = dashboard.dumps(dashboard.render(config, region=args.region,
                                            application=args.application))
    out = Path(args.out) if args.out else Path(args.root) / dashboard.DASHBOARD_PATH
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out}: differs from a fresh render (run `keel render-cloudwatch`)",
                  file=sys.stderr)
            return 1
        print(f"{out}: up to date")
        return 0
    from graph.files import write_atomic

    changed = not out.exists() or out.read_text() != text
    if changed:
        write_atomic(out, text.encode())
    print(f"{out}: {'written' if changed else 'unchanged'}")
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    from deployments.ingress.auth import hash_key

    if args.new:
        key = secrets.token_urlsafe(32)
        print(f"key (give it to the client; it is shown only now): {key}", file=sys.stderr)
    else:
        key = (args.key if args.key is not None else sys.stdin.readline()).strip()
    if len(key) < 16:
        print("keel: a key must be at least 16 characters (use --new for a random one)",
              file=sys.stderr)
        return 2
    entry: dict[str, object] = {"name": args.name, "sha256": hash_key(key)}
    if args.tenant:
        entry["tenant"] = args.tenant
    entry["models"] = args.models or ["*"]
    print(json.dumps(entry))
    return 0


def _payloads(args: argparse.Namespace) -> int:
    """Print the payload log's newest records (oldest first), one JSON event per line;
    ``--follow`` then waits for more."""
    import redis

    from deployments.settings import RedisSettings
    from deployments.storage.remote import redacted

    settings = RedisSettings()
    url = args.redis_url or settings.url
    if not url:
        print("keel: no Redis (set KEEL_REDIS_URL or pass --redis-url)", file=sys.stderr)
        return 2
    client: Any = redis.Redis.from_url(
        url, password=settings.password.get_secret_value() if settings.password else None,
        socket_connect_timeout=2)
    try:
        entries = list(reversed(client.xrevrange(args.stream, count=args.count)))
        # Follow from the last record printed; an empty stream: from its start, so nothing
        # added between two reads is missed ("$" would skip those).
        last = entries[-1][0] if entries else b"0-0"
        for _, fields in entries:
            print(fields[b"event"].decode(), flush=True)
        while args.follow:
            for _, batch in client.xread({args.stream: last}, block=1000, count=100) or []:
                for entry_id, fields in batch:
                    print(fields[b"event"].decode(), flush=True)
                    last = entry_id
    except redis.RedisError as exc:
        print(f"keel: Redis at {redacted(url)}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from graph.supervise import serve

    return serve(args.config, grace_s=args.grace)


def _demo_llm(args: argparse.Namespace) -> int:
    from graph.demo.llm_upstream import FakeUpstream

    upstream = FakeUpstream(host=args.host, port=args.port).start()
    print(f"echoing chat completions on {upstream.url} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        upstream.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="build the demo models and feature store")
    prepare.add_argument("--repository", default="models")
    prepare.add_argument("--force", action="store_true", help="rebuild even if up to date")
    prepare.add_argument("--feature-repo", default="configs/feast",
                         help="Feast repository to fill with the demo features ('' skips it)")
    prepare.add_argument("--feature-store-yaml", default=None,
                         help="its configuration file (default: feature_store.yaml; e.g. "
                              "feature_store.production.yaml for Redis + PostgreSQL)")
    prepare.set_defaults(run=_prepare)
    check = sub.add_parser("check-config", help="validate a serve config (Ray + Keel rules)")
    check.add_argument("config", nargs="?", default="serve_config.yaml")
    check.set_defaults(run=_check)
    models = sub.add_parser("models", help="list the models and versions in a repository")
    models.add_argument("--repository", default="models")
    models.set_defaults(run=_models)
    render = sub.add_parser("render-k8s", help="render cluster/kuberay/ from serve_config.yaml "
                            "and the production overlay")
    render.add_argument("--root", default=".", help="the repository root")
    render.add_argument("--serve-config", default=None, help="default: <root>/serve_config.yaml")
    render.add_argument("--overlay", default=None,
                        help="default: <root>/configs/serve/overlays/production.yaml")
    render.add_argument("--crd", default=None, help="the RayService CRD to validate against "
                        "(default: <root>/../shared/schemas/kuberay/ray.io_rayservices.yaml)")
    render.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a committed file differs from a render")
    render.set_defaults(run=_render_k8s)
    cw = sub.add_parser("render-cloudwatch", help="render the CloudWatch SLO dashboard "
                        "(configs/monitoring/cloudwatch/keel-slo-dashboard.json)")
    cw.add_argument("--root", default=".", help="the repository root")
    cw.add_argument("--out", default=None, help="default: <root>/configs/monitoring/"
                    "cloudwatch/keel-slo-dashboard.json")
    cw.add_argument("--region", default="us-east-1", help="the region of every widget")
    cw.add_argument("--application", default="keel",
                    help="the Serve application the dashboard shows first (a variable)")
    cw.add_argument("--from-env", action="store_true", help="namespace and dimensions from "
                    "KEEL_CLOUDWATCH_* (default: the exporter's defaults)")
    cw.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the file differs from a render")
    cw.set_defaults(run=_render_cloudwatch)
    payloads = sub.add_parser("payloads", help="read the payload log (a Redis Stream)")
    payloads.add_argument("action", choices=["tail"])
    payloads.add_argument("-n", "--count", type=int, default=10,
                          help="how many of the newest records (default 10)")
    payloads.add_argument("-f", "--follow", action="store_true",
                          help="then print new records as they come (Ctrl-C stops)")
    payloads.add_argument("--stream", default="keel:payloads",
                          help="the stream (Ingress user_config.payloads.stream)")
    payloads.add_argument("--redis-url", default=None,
                          help="default: KEEL_REDIS_URL (password: KEEL_REDIS_PASSWORD)")
    payloads.set_defaults(run=_payloads)
    run = sub.add_parser("serve", help="`serve run` a config, and on Ctrl-C/SIGTERM end every "
                         "process it started (Ray's HAProxy included)")
    run.add_argument("config", nargs="?", default="serve_config.yaml")
    run.add_argument("--grace", type=float, default=15.0,
                     help="seconds Serve gets to stop before what is left is killed")
    run.set_defaults(run=_serve)
    hashing = sub.add_parser("hash-key", help="print the KEEL_API_KEYS entry of an API key "
                             "(the key from the argument, stdin, or --new)")
    hashing.add_argument("key", nargs="?", default=None,
                         help="the key (default: one line of stdin; an argument may stay in "
                              "your shell history)")
    hashing.add_argument("--new", action="store_true", help="make a random key (to stderr)")
    hashing.add_argument("--name", default="client", help="the key's name (in logs, errors)")
    hashing.add_argument("--tenant", default=None, help="the LLM tenant the key bills")
    hashing.add_argument("--models", nargs="*", default=None, help="models it may use "
                         "(default: all)")
    hashing.set_defaults(run=_hash_key)
    echo = sub.add_parser("demo-llm", help="an OpenAI-compatible echo server for the demo's "
                          "LLM gateway (serve_config.yaml's local-vllm upstream: port 8001)")
    echo.add_argument("--host", default="127.0.0.1")
    echo.add_argument("--port", type=int, default=8001)
    echo.set_defaults(run=_demo_llm)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.run(args)
    except KeelError as exc:
        print(f"keel: {exc.message}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
