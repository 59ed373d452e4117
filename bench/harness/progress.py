"""Log lines and progress on stderr.

``log`` writes one time-stamped line. ``Progress`` shows how far a run is (points or
phases done out of all of them): a rich progress bar when stderr is a terminal, one
plain line per step otherwise (a file, a pipe, CI; with many small steps, such as
requests, one line every ``PLAIN_EVERY_S`` seconds). While a bar is shown, ``log`` lines
print above it.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from types import TracebackType
from typing import Any

_live: Any = None  # the rich Progress being shown, if any
#: Without a terminal, a run of more than MANY steps says how far it is this often.
PLAIN_EVERY_S = 10.0
MANY = 50


def log(message: str) -> None:
    """One line on stderr, prefixed with the time of day."""
    line = f"[{dt.datetime.now():%H:%M:%S}] {message}"
    if _live is not None:
        _live.console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        print(line, file=sys.stderr, flush=True)


class Progress:
    """``with Progress("serving_core", total=12) as progress: ... progress.advance("keel
    c=8")``: a bar (or plain lines) of ``total`` steps. ``total`` may be None (unknown:
    a running count) and can be raised with ``add``."""

    def __init__(self, title: str, total: int | None, *, unit: str = "points") -> None:
        self.title = title
        self.total = total
        self.unit = unit
        self.done = 0
        self.began = time.monotonic()
        self._bar: Any = None
        self._task: Any = None
        self._said = 0.0  # when the last plain line was written

    def __enter__(self) -> Progress:
        global _live
        if sys.stderr.isatty() and _live is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[step]}"),
                console=Console(stderr=True), transient=False)
            self._task = self._bar.add_task(self.title, total=self.total, step="")
            self._bar.start()
            _live = self._bar
        return self

    def step(self, what: str) -> None:
        """Say what runs now (shown beside the bar; a plain line without one)."""
        if self._bar is not None:
            self._bar.update(self._task, step=what)
        elif not self._many():
            log(f"{self.title}: {self._count()} {what} ...")

    def add(self, steps: int) -> None:
        """``steps`` more steps than planned."""
        self.total = (self.total or 0) + steps
        if self._bar is not None:
            self._bar.update(self._task, total=self.total)

    def advance(self, what: str = "") -> None:
        """One step done."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, step=what)
        elif (not self._many() or self.done == self.total
              or time.monotonic() - self._said >= PLAIN_EVERY_S):
            self._said = time.monotonic()
            log(f"{self.title}: {self._count()} {self.unit} done"
                + (f" ({what})" if what else "")
                + f", {time.monotonic() - self.began:.0f} s")

    def _many(self) -> bool:
        return self.total is not None and self.total > MANY

    def _count(self) -> str:
        return f"{self.done}/{self.total}" if self.total is not None else str(self.done)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        global _live
        if self._bar is not None:
            self._bar.stop()
            if _live is self._bar:
                _live = None
