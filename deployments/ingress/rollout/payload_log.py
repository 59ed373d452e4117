"""Payload logging: a sample of answered requests, appended to a Redis Stream. No Ray here.

Once a request's answer is computed, a sampled one (``rate``) is offered to
``PayloadLog.offer``: a bounded queue (full: dropped and counted). One worker task takes
what is waiting, builds the records (after the answers have gone) and appends them in
one pipeline, an ``XADD <stream> MAXLEN ~ <max_len> * event <json>`` each. Each record
is a CloudEvents 1.0 event (JSON format) whose ``data`` holds the request id, model and
version, inputs and outputs, cache status per row, latency, and the API key's *name* and
tenant (never the key, never a header). Redis down or slow: the records are dropped and
counted, and writes pause for ``retry_after_s``; no request ever waits for, or fails on,
the log.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deployments.background import AfterAnswer
from deployments.ingress.auth import Caller

log = logging.getLogger(__name__)

#: Why a record was not appended: the queue was full, no Redis is configured, or Redis
#: failed (an error or a timeout, and the pause after it).
DROP_REASONS = ("queue_full", "no_redis", "redis_error")
EVENT_TYPE = "dev.keel.prediction.v1"


class PayloadLogConfig(BaseModel):
    """``Ingress.user_config.payloads``: live, like every user_config field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Share of answered requests logged, in [0, 1]; 0 (the default) turns the log off.
    rate: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    #: The Redis Stream the records go to (in the prediction cache's Redis).
    stream: str = Field(default="keel:payloads", min_length=1, max_length=256)
    #: The stream's approximate length bound (``XADD ... MAXLEN ~``): older records go.
    max_len: int = Field(default=100_000, ge=1, le=100_000_000)
    #: Records waiting for Redis in one ingress replica; more are dropped and counted.
    queue: int = Field(default=1024, ge=1, le=1_000_000)
    #: Largest number of rows of one request whose inputs and outputs are logged (the
    #: record says how many rows there were).
    max_rows: int = Field(default=64, ge=1, le=10_000)
    #: Logged rows per model version the drift monitor compares with the training
    #: distribution (``keel_feature_drift_psi``).
    drift_window: int = Field(default=2000, ge=100, le=1_000_000)


class PayloadSink(Protocol):
    """Where records go: Redis commands sent in one pipeline (the cache's ``RedisStore``)."""

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]: ...


class PayloadObserver(Protocol):
    """Told how many records were appended and how many dropped, and why (metrics)."""

    def payloads_logged(self, count: int) -> None: ...

    def payloads_dropped(self, reason: str, count: int) -> None: ...


def _tensor(values: np.ndarray, max_rows: int) -> Any:
    rows = values[:max_rows] if values.ndim >= 1 else values
    if rows.dtype.kind == "f":
        # JSON has no NaN or infinity: they are logged as null.
        finite = np.isfinite(rows)
        if not finite.all():
            return np.where(finite, rows.astype(object), np.array(None)).tolist()
    if rows.dtype.kind in "SO":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in rows.reshape(-1)]
    return rows.tolist()


def make_event(*, request_id: str | None, model: str, version: str, endpoint: str,
               inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
               cache: Sequence[str], latency_ms: float, caller: Caller | None,
               source: str, max_rows: int, extra: dict[str, Any] | None = None,
               now: float | None = None) -> dict[str, Any]:
    """One CloudEvents 1.0 event (structured JSON) for an answered request; ``extra`` adds
    fields to its ``data`` (``/v1/decide``: the entity keys)."""
    rows = next((len(v) for v in inputs.values() if v.ndim >= 1), 1)
    moment = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    return {
        "specversion": "1.0",
        "type": EVENT_TYPE,
        "source": source,
        "id": uuid.uuid4().hex,
        "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "subject": f"{model}/{version}",
        "datacontenttype": "application/json",
        "data": {
            "request_id": request_id,
            "endpoint": endpoint,
            "model": model,
            "version": version,
            "rows": rows,
            "rows_logged": min(rows, max_rows),
            "inputs": {name: _tensor(v, max_rows) for name, v in inputs.items()},
            "outputs": {name: _tensor(v, max_rows) for name, v in outputs.items()},
            "cache": list(cache[:max_rows]),
            "latency_ms": round(latency_ms, 3),
            "key": caller.key if caller else None,
            "tenant": caller.tenant if caller else None,
            **(extra or {}),
        },
    }


#: Builds one record from the log's settings (``max_rows``), in the worker.
EventOf = Callable[[PayloadLogConfig], dict[str, Any]]


class PayloadLog:
    """The sampled, bounded queue of payload records and the worker that appends them.

    ``config()`` is read on every offer, so a changed rate or stream applies at once.
    ``sink`` is ``None`` when no Redis is configured: every sampled record is dropped
    (``no_redis``), counted, so a rate set with nowhere to write shows in the metrics.
    """

    def __init__(self, sink: PayloadSink | None, config: Callable[[], PayloadLogConfig], *,
                 source: str, observer: PayloadObserver | None = None,
                 retry_after_s: float = 1.0, batch_size: int = 256,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 queue: AfterAnswer | None = None) -> None:
        self.sink = sink
        self._config = config
        self.source = source
        self.observer = observer
        self.retry_after_s = retry_after_s
        self.batch_size = batch_size
        self._rng = rng or random.Random()
        self._clock = clock
        # The process's after-the-answer queue, lane "payload_record".
        self._queue = (queue or AfterAnswer()).lane(
            "payload_record", self._handle, lambda: self.batch_size,
            limit=lambda: self._config().queue)
        self._paused_until = float("-inf")
        self._last_log = float("-inf")
        self.logged = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    def sampled(self) -> bool:
        """Whether the next answered request is logged (draws against ``rate``)."""
        rate = self._config().rate
        return rate > 0.0 and (rate >= 1.0 or self._rng.random() < rate)

    def offer(self, event: EventOf) -> bool:
        """Queue a record; ``event(config)`` builds it later, in the worker, after the
        answer has gone. Never raises, never waits; False when the record is dropped."""
        config = self._config()
        if self.sink is None:
            self._drop("no_redis", 1)
            return False
        if not self._queue.offer((config, event)):
            self._drop("queue_full", 1)
            return False
        return True

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def settled(self, timeout_s: float = 30.0) -> None:
        """Wait until every record queued so far is appended or dropped (tests, shutdown)."""
        await self._queue.settled(timeout_s)

    def state(self) -> dict[str, Any]:
        config = self._config()
        return {"rate": config.rate, "stream": config.stream, "max_len": config.max_len,
                "redis": self.sink is not None, "waiting": len(self._queue),
                "capacity": config.queue, "logged": self.logged, "dropped": dict(self.dropped)}

    def _drop(self, reason: str, count: int) -> None:
        self.dropped[reason] += count
        if self.observer is not None:
            self.observer.payloads_dropped(reason, count)

    async def _handle(self, taken: list[tuple[PayloadLogConfig, EventOf]]) -> None:
        if self._clock() < self._paused_until:
            self._drop("redis_error", len(taken))
            return
        commands: list[tuple[Any, ...]] = []
        for config, event in taken:
            try:
                body = json.dumps(event(config), separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as exc:  # a bug, never the request's failure
                log.warning("payload log: a record could not be encoded: %s", exc)
                self._drop("redis_error", 1)
                continue
            commands.append(("XADD", config.stream, "MAXLEN", "~", config.max_len, "*",
                             "event", body))
        if commands:
            await self._append(commands)

    async def _append(self, commands: list[tuple[Any, ...]]) -> None:
        assert self.sink is not None  # offer() queues nothing without a sink
        try:
            await self.sink.execute(commands)
        except Exception as exc:  # Redis down, slow or refusing: counted, never raised
            self._paused_until = self._clock() + self.retry_after_s
            self._drop("redis_error", len(commands))
            now = self._clock()
            if now - self._last_log >= 10.0:
                self._last_log = now
                log.warning("payload log: Redis failed (%s: %s); %d records dropped, "
                            "pausing %.1f s (dropped so far: %s)", type(exc).__name__, exc,
                            len(commands), self.retry_after_s, self.dropped)
            return
        self.logged += len(commands)
        if self.observer is not None:
            self.observer.payloads_logged(len(commands))
