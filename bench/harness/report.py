"""What a scenario writes: its JSON document (saved after every step, so an interrupted
run keeps what it measured), its PNG, markdown cells, and where they go."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.harness.progress import log

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def rel(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (for logs and JSON)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: ``-`` for None, else the number with ``digits`` decimals."""
    return "-" if value is None else f"{value:,.{digits}f}"


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as JSON values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def environment() -> dict[str, Any]:
    """Python, platform, CPUs, load and the versions of the packages that matter."""
    from importlib.metadata import PackageNotFoundError, version

    packages: dict[str, str | None] = {}
    for name in ("ray", "onnxruntime", "fastapi", "uvicorn", "aiohttp", "numpy", "keel"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "packages": packages}


def stamped_paths(out: Path, name: str, *, daily: bool = False) -> tuple[Path, Path]:
    """``<out>/<stamp>-<name>.json`` and its logs folder ``<stamp>-<name>-logs``; the
    stamp is the date and time (``20261202-130102``), or with ``daily`` the date alone
    (``2026-12-02``, or the date and time when that file exists). ``name`` may be empty."""
    now = dt.datetime.now()
    suffix = f"-{name}" if name else ""
    stem = f"{now:%Y-%m-%d}{suffix}" if daily else f"{now:%Y%m%d-%H%M%S}{suffix}"
    if daily and (out / f"{stem}.json").exists():
        stem = f"{now:%Y-%m-%d-%H%M%S}{suffix}"
    return out / f"{stem}.json", out / f"{stem}-logs"


class RunDocument:
    """The JSON document of one run: ``started_at``, ``settings``, the given fields,
    ``runs``; ``save`` adds ``summarise(document)`` and ``elapsed_s`` and writes it."""

    def __init__(self, path: Path, args: argparse.Namespace | dict[str, Any],
                 summarise: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 **fields: Any) -> None:
        self.path = path
        self.summarise = summarise
        self.began = time.monotonic()
        settings = settings_of(args) if isinstance(args, argparse.Namespace) else args
        self.data: dict[str, Any] = {
            "started_at": dt.datetime.now().isoformat(timespec="seconds"),
            "settings": settings, **fields}
        self.data.setdefault("runs", [])

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def save(self) -> None:
        if self.summarise is not None:
            self.data.update(self.summarise(self.data))
        self.data["elapsed_s"] = round(time.monotonic() - self.began, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def run_interruptibly(body: Callable[[], None]) -> bool:
    """Run ``body``; True when Ctrl-C (or a SIGTERM turned into KeyboardInterrupt) cut
    it short: the caller then writes what was measured and exits with 130."""
    try:
        body()
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
        return True
    return False


def interrupt_on_sigterm() -> None:
    """SIGTERM tears down like Ctrl-C: every started server is stopped on the way out."""
    import signal

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


# --------------------------------------------------------------------------- tables

RATIO_TITLES = {"rps": "req/s", "rows_per_s": "rows/s", "p50_ms": "p50", "p95_ms": "p95",
                "p99_ms": "p99", "cpu_ms_per_request": "CPU ms/req"}


def median_table(medians: dict[str, dict[str, dict[str, Any]]], names: Sequence[str],
                 keys: Sequence[Any], head: Sequence[str],
                 cells: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    """A markdown table of medians: one row per name and key (``| name | key | cells |``,
    ``failed`` where the name has no row for the key); ``head`` names every column."""
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for name in names:
        for key in keys:
            row = medians.get(name, {}).get(str(key))
            if row is None:
                lines.append(f"| {name} | {key} | failed |" + " |" * (len(head) - 3))
            else:
                lines.append(f"| {name} | {key} | " + " | ".join(cells(row)) + " |")
    return lines


def ratio_table(ratios: dict[str, dict[str, dict[str, Any]]], *, key_head: str = "ratio",
                point_head: str = "concurrency", extra: Sequence[str] = ()) -> list[str]:
    """A markdown table of ratios (``statistics.ratio`` rows, and the ``extra`` metrics):
    one row per ratio and point."""
    metrics = ["rps", "p50_ms", "p95_ms", "p99_ms", *extra]
    lines = [f"| {key_head} | {point_head} | "
             + " | ".join(RATIO_TITLES[m] for m in metrics) + " |",
             "|---|---|" + "---:|" * len(metrics)]
    for key, by_point in ratios.items():
        for point, row in by_point.items():
            lines.append(f"| {key} | {point} | "
                         + " | ".join(fmt(row.get(m), 2) for m in metrics) + " |")
    return lines


# --------------------------------------------------------------------------- plots


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, title: str | None = None) -> None:
    """Title, tight layout, 110 dpi PNG at ``path``; the figure is closed."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def concurrency_axes(axes: Sequence[tuple[Any, str]], concurrencies: Sequence[int], *,
                     log_y: bool = True) -> None:
    """Concurrency on a log2 x axis (ticks at the measured values) and the y label; the
    y axis on a log scale, or linear from 0."""
    from matplotlib.ticker import NullLocator

    for ax, ylabel in axes:
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        if concurrencies:
            ticks = sorted(concurrencies)
            ax.set_xticks(ticks, [str(c) for c in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)


def plot_sweep(summary: dict[str, Any], names: list[str], path: Path, title: str, *,
               style: Callable[[str], str], log_y: bool = True) -> None:
    """rps and p95 against concurrency, one line per name (``summary["medians"]``);
    ``style`` gives a name's line style; ``log_y`` puts both y axes on a log scale (the
    single-process baseline is an order of magnitude above the Ray targets, which would
    otherwise lie flat on the floor), else linear from 0."""
    plt = pyplot()
    fig, (ax_rps, ax_p95) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in names:
        rows = summary["medians"].get(name, {})
        xs = sorted(int(c) for c in rows)
        if not xs:
            continue
        line = style(name)
        ax_rps.plot(xs, [rows[str(x)]["rps"] for x in xs], line, marker="o", label=name)
        ax_p95.plot(xs, [rows[str(x)]["p95_ms"] if rows[str(x)]["p95_ms"] is not None
                         else float("nan") for x in xs], line, marker="o", label=name)
    concurrencies = sorted({int(c) for rows in summary["medians"].values() for c in rows})
    scale = ", log" if log_y else ""
    concurrency_axes([(ax_rps, f"requests/s (median{scale})"),
                      (ax_p95, f"p95 latency, ms (median{scale})")], concurrencies,
                     log_y=log_y)
    if ax_rps.lines:
        ax_rps.legend(fontsize=8)
    save_figure(fig, path, title)


def plot_bars(groups: list[str], series: dict[str, list[float | None]], path: Path, title: str,
              *, ylabel: str, log_y: bool = False) -> None:
    """One bar per series in each group (None: no bar), e.g. rows/s per model and batch."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(series)) / 2), 4.5))
    width = 0.8 / max(1, len(series))
    xs = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(xs - 0.4 + width * (i + 0.5), [float("nan") if v is None else v for v in values],
               width, label=name)
    ax.set_xticks(xs, groups)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    save_figure(fig, path, title)


def text_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Right-aligned plain-text columns."""
    widths = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c)).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
