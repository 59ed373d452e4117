"""Steady closed-loop HTTP load for tests that change a running application under it.

Each client thread sends one request, waits for the answer and sends the next,
until stopped. Every answer is recorded with its time, so a test can line the
answers up with what the cluster did (replicas added, a node lost, a config
applied) and count failures per phase.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

#: Status recorded for a request that got no HTTP answer at all (connection refused,
#: reset, timeout).
NO_ANSWER = 0


@dataclass(frozen=True)
class Answer:
    """One request as the client saw it."""

    t: float  # seconds since the load's clock started, when the answer came
    route: str
    status: int  # NO_ANSWER when the request got no HTTP answer
    body: Any  # parsed JSON for 200, else the text or the exception's repr
    retried: bool = False  # the first try failed (503 or no answer) and this is the retry
    retry_after: str | None = None  # the Retry-After header, if any
    took_s: float = 0.0  # from sending the request to its answer

    @property
    def sent(self) -> float:
        """When the request was sent (the load's clock)."""
        return self.t - self.took_s

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def error(self) -> str:
        """The error body (or the exception) of a failed answer; empty when ok."""
        return "" if self.ok else str(self.body)

    @property
    def version(self) -> str | None:
        """The ``model_version`` of an answered inference."""
        return self.body.get("model_version") if self.ok and isinstance(self.body, dict) \
            else None


Request = Callable[[httpx.Client, int], httpx.Response]


@dataclass
class SteadyLoad:
    """Client threads that each run ``request(client, i)`` in a loop.

    ``retry_once``: a 503 or a request without an answer is tried once more
    (what a client that honours Retry-After does); both tries are recorded, the
    first as a raw failure.
    """

    base_url: str
    clock: float = field(default_factory=time.monotonic)
    timeout_s: float = 60.0
    retry_once: bool = False
    answers: list[Answer] = field(default_factory=list)
    _threads: list[tuple[threading.Thread, threading.Event]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.clock

    def __enter__(self) -> SteadyLoad:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self, route: str, request: Request, clients: int = 1) -> threading.Event:
        """Start ``clients`` threads on ``request``; set the returned event to stop them."""
        stop = threading.Event()
        for k in range(clients):
            thread = threading.Thread(target=self._run, args=(route, request, k, stop),
                                      daemon=True, name=f"load-{route}-{k}")
            thread.start()
            self._threads.append((thread, stop))
        return stop

    def stop(self, event: threading.Event | None = None, timeout_s: float = 120) -> None:
        """Stop the threads of ``event`` (all threads when None) and wait for them."""
        chosen = [(t, e) for t, e in self._threads if event is None or e is event]
        for _, e in chosen:
            e.set()
        for t, _ in chosen:
            t.join(timeout=timeout_s)
        self._threads = [(t, e) for t, e in self._threads if t.is_alive()]

    def _run(self, route: str, request: Request, offset: int, stop: threading.Event) -> None:
        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as client:
            i = offset * 100_003
            while not stop.is_set():
                answer = self._send(client, route, request, i, retried=False)
                if self.retry_once and answer.status in (503, NO_ANSWER):
                    time.sleep(0.2)
                    self._send(client, route, request, i, retried=True)
                i += 1

    def _send(self, client: httpx.Client, route: str, request: Request, i: int,
              retried: bool) -> Answer:
        retry_after = None
        sent = time.monotonic()
        try:
            response = request(client, i)
            status = response.status_code
            body: Any = response.json() if status == 200 else response.text[:300]
            retry_after = response.headers.get("retry-after")
        except httpx.HTTPError as exc:
            status, body = NO_ANSWER, repr(exc)[:300]
        answer = Answer(self.now(), route, status, body, retried, retry_after,
                        time.monotonic() - sent)
        self.answers.append(answer)  # list.append is atomic under the GIL
        return answer

    def between(self, start: float, end: float, route: str | None = None) -> list[Answer]:
        return [a for a in self.answers
                if start <= a.t < end and (route is None or a.route == route)]

    def within(self, route: str | None = None, since: float = float("-inf"),
               until: float = float("inf")) -> list[Answer]:
        """The answers (to ``route``) that came between ``since`` and ``until`` (inclusive,
        on this load's clock, see ``now``)."""
        return [a for a in list(self.answers)
                if since <= a.t <= until and (route is None or a.route == route)]

    def accepted(self, route: str | None = None, since: float = float("-inf"),
                 until: float = float("inf")) -> int:
        return sum(a.ok for a in self.within(route, since, until))

    def failures(self, route: str | None = None, since: float = float("-inf"),
                 until: float = float("inf"), *, after_retry: bool = False) -> list[Answer]:
        """Failed answers; ``after_retry``: only those the client's retry did not save
        (a failed retry, or a failed first try that was not retried)."""
        failed = [a for a in self.within(route, since, until) if not a.ok]
        if not after_retry:
            return failed
        return [a for a in failed
                if a.retried or not self.retry_once or a.status not in (503, NO_ANSWER)]

    def summary(self, route: str | None = None, since: float = float("-inf"),
                until: float = float("inf")) -> dict[str, Any]:
        failures = self.failures(route, since, until)
        return {"accepted": self.accepted(route, since, until), "failed": len(failures),
                "failed_statuses": dict(Counter(a.status for a in failures))}

    def wait_accepted(self, more: int, route: str | None = None,
                      timeout_s: float = 60) -> None:
        """Block until ``more`` further requests (to ``route``) were answered 200."""
        target = self.accepted(route) + more
        deadline = time.monotonic() + timeout_s
        while self.accepted(route) < target:
            assert time.monotonic() < deadline, (
                f"{more} more accepted {route or 'requests'} not within {timeout_s} s "
                f"(failures: {Counter(a.status for a in self.failures(route))})")
            time.sleep(0.1)


def per_second(load: SteadyLoad, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The timeline: per whole second, answers ok/failed and the last sample seen
    (each sample a dict with ``t`` and whatever the test recorded)."""
    end = int(max([a.t for a in load.answers] + [s["t"] for s in samples] + [0])) + 1
    rows = []
    for second in range(end):
        answers = load.between(second, second + 1)
        sample: dict[str, Any] = next(
            (s for s in reversed(samples) if s["t"] < second + 1), {})
        rows.append({**{k: v for k, v in sample.items() if k != "t"}, "t": second,
                     "ok": sum(a.ok for a in answers),
                     "failed": sum(not a.ok for a in answers)})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as a fixed-width text table (the keys of the first row are the columns)."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
