"""Hedged calls: the first answer of up to N attempts of a call without side effects.

No Ray here. ``first_answer`` sends a call, and sends it again beside the earlier
attempts each time ``retry_after_s`` passes with no answer, or at once when an attempt
fails in a way that says its replica was lost; the first attempt that answers wins
and the others are cancelled. Against a hung replica this is what bounds a request's
wait: an attempt routed to it never answers (and Serve's router, which still counts the
hung replica's last queue length, may route a plain resend to it again), while each
further attempt has another chance at a live replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts of one call at most (the first and three more). Serve's router trusts a
#: replica's cached queue length for 10 s (``RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S``), so
#: in the first seconds of a hang it may send several attempts to the hung replica; with
#: the default 5 s between attempts the fourth starts after that cache has lapsed.
MAX_ATTEMPTS = 4


async def first_answer(send: Callable[[], Awaitable[T]], retry_after_s: float | None, *,
                       lost: Callable[[BaseException], bool],
                       max_attempts: int = MAX_ATTEMPTS,
                       what: str = "a call") -> T:
    """The first answer of up to ``max_attempts`` attempts of ``send()``.

    Another attempt starts when ``retry_after_s`` passes with no answer (``None``: never
    for that reason) or when an attempt raises an error ``lost`` accepts; any other error
    is raised at once. When every attempt was lost, the last such error is raised. The
    attempts still running when this returns or is cancelled are cancelled.
    """
    pending: set[asyncio.Future[T]] = {asyncio.ensure_future(send())}
    attempts = 1
    failure: BaseException | None = None
    try:
        while pending:
            timeout = retry_after_s if attempts < max_attempts else None
            done, pending = await asyncio.wait(pending, timeout=timeout,
                                               return_when=asyncio.FIRST_COMPLETED)
            resend = not done  # nothing answered in time: one more beside the others
            for attempt in done:
                error = attempt.exception()
                if error is None:
                    return attempt.result()
                if not lost(error):
                    raise error
                failure, resend = error, True
            if resend and attempts < max_attempts:
                attempts += 1
                log.warning("%s: %s; attempt %d of %d", what,
                            f"no answer after {retry_after_s} s" if not done else
                            f"lost ({failure})", attempts, max_attempts)
                pending.add(asyncio.ensure_future(send()))
        assert failure is not None  # the loop only ends once every attempt failed
        raise failure
    finally:
        for attempt in pending:
            attempt.cancel()
