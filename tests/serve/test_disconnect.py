"""A client that goes away cancels its work, behind HAProxy and Serve's direct ingress.

The client writes a whole request, then closes its connection while the request waits
for a batch (FeatureService or model deployment, ``SLOW_BATCH_S`` each): the request
must never reach that batch. Written both as one write and as headers then body (how
most clients write, and the way that HAProxy's ``option splice-request`` used to
swallow the close: graph/haproxy_nosplice.py, docs/api/errors.md).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from graph.haproxy_nosplice import BINARY_ENV, real_haproxy, wrapper
from tests.support.serve_app import SLOW_BATCH_S, KeelApp, changed, served_rows

pytestmark = pytest.mark.slow

#: How long the client waits before it goes away: its request is queued for its batch.
LEAVE_AFTER_S = 0.3
WRITES = ["one write", "headers, then body"]
#: Where to look first when an abandoned request still ran.
NO_SPLICE = ("(does Ray run HAProxy without splice()? RAY_SERVE_HAPROXY_BINARY_PATH: "
             "graph/haproxy_nosplice.py)")


def decide_body(account: int) -> dict[str, Any]:
    # SYM047 with these accounts: no other test asks for them, so no feature row of
    # theirs is held by the ingress (a held row would skip the lookup and pass trivially).
    return {"model": "risk_gbdt",
            "entities": [{"symbol": "SYM047", "account_id": f"ACC{account:04d}"}]}


def infer_body(seed: int) -> dict[str, Any]:
    x = np.random.default_rng(seed).normal(size=4).astype(np.float32)
    return {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                        "data": x.tolist()}]}


def abandon(base_url: str, path: str, body: dict[str, Any], *, split: bool) -> None:
    """POST ``body`` on a connection of its own and close it before the answer."""
    url = httpx.URL(base_url)
    assert url.host and url.port
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection((url.host, url.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if split:
            sock.sendall(head)
            time.sleep(0.05)  # two TCP segments: the body arrives after the headers
            sock.sendall(data)
        else:
            sock.sendall(head + data)
        time.sleep(LEAVE_AFTER_S)


@pytest.fixture(scope="module")
def slow_batches(keel_app: KeelApp) -> Iterator[KeelApp]:
    """Every feature lookup and every call of the linear model waits SLOW_BATCH_S for
    its batch."""
    with changed(keel_app, FeatureService={"batch_wait_timeout_s": SLOW_BATCH_S},
                 linear={"batch_wait_timeout_s": SLOW_BATCH_S}):
        yield keel_app


@pytest.mark.parametrize("write", WRITES)
def test_an_abandoned_request_never_reaches_its_batch(slow_batches: KeelApp,
                                                      write: str) -> None:
    n = WRITES.index(write)
    base = slow_batches.base_url
    lookups, rows = served_rows("FeatureService"), served_rows("linear")
    with ThreadPoolExecutor(2) as pool:
        left = [pool.submit(abandon, base, "/v1/decide", decide_body(190 + 4 * n),
                            split=n == 1),
                pool.submit(abandon, base, "/v2/models/linear/infer", infer_body(9000 + n),
                            split=n == 1)]
        for gone in left:
            gone.result()
    time.sleep(SLOW_BATCH_S * 2.5)  # past the batches the requests were waiting for
    assert served_rows("FeatureService") == lookups, \
        f"the abandoned /v1/decide still looked its features up {NO_SPLICE}"
    assert served_rows("linear") == rows, f"the abandoned infer still reached the model {NO_SPLICE}"

    # The measure works: the same requests, waited for, are served in those batches.
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(httpx.post, f"{base}/v1/decide", json=decide_body(191 + 4 * n),
                               timeout=30),
                   pool.submit(httpx.post, f"{base}/v2/models/linear/infer",
                               json=infer_body(9100 + n), timeout=30)]
        for answer in answers:
            assert answer.result().status_code == 200, answer.result().text
    assert served_rows("FeatureService") == lookups + 1
    assert served_rows("linear") == rows + 1


def test_the_haproxy_wrapper_runs_haproxy_without_splice(tmp_path: Any) -> None:
    """The wrapper Ray is pointed at (RAY_SERVE_HAPROXY_BINARY_PATH) runs the real
    binary with -dS and Ray's arguments."""
    path = wrapper(tmp_path)
    assert " -dS " in path.read_text()
    run = subprocess.run([str(path), "-v"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and "HAProxy version" in run.stdout, run
    assert wrapper(tmp_path) == path  # written once
    # Pointed at the wrapper already, the real binary is still the one wrapped.
    assert real_haproxy({BINARY_ENV: str(path)}) == real_haproxy({})
