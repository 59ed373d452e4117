"""Time budgets and back-pressure on the real application: a stage that runs out of time
answers 504 naming the stage and its work is cancelled (the request never reaches a
batch); an overloaded ingress answers 503 with Retry-After. (A client that disconnects is
NOT reliably cancelled behind HAProxy and Serve's direct ingress: docs/api/errors.md.)"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support.serve_app import SLOW_BATCH_S, KeelApp, changed, served_rows

pytestmark = pytest.mark.slow

BUDGET_S = 0.4


def infer_row(seed: int) -> dict[str, Any]:
    x = np.random.default_rng(seed).normal(size=(1, 4)).astype(np.float32)
    return {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}


def wait_until_batches_would_have_run() -> None:
    time.sleep(SLOW_BATCH_S * 2.5)


def test_a_slow_model_is_504_naming_the_stage_and_its_work_is_cancelled(
        keel_app: KeelApp) -> None:
    with changed(keel_app, Ingress={"request_timeout_s": BUDGET_S},
                 linear={"batch_wait_timeout_s": SLOW_BATCH_S}):
        before = served_rows("linear")
        started = time.monotonic()
        answer = httpx.post(f"{keel_app.base_url}/v2/models/linear/infer", json=infer_row(1),
                            timeout=30)
        elapsed = time.monotonic() - started
        assert answer.status_code == 504, answer.text
        body = answer.json()
        assert body["stage"] == "model" and "'linear'" in body["error"], body
        assert elapsed < SLOW_BATCH_S + 5  # answered at the budget, not the batch or 30 s
        wait_until_batches_would_have_run()
        assert served_rows("linear") == before, "the timed-out request still ran"
    # The budget back at its default: the same kind of request is fine.
    ok = httpx.post(f"{keel_app.base_url}/v2/models/linear/infer", json=infer_row(2), timeout=30)
    assert ok.status_code == 200, ok.text


def decide_body(account: int) -> dict[str, Any]:
    return {"model": "risk_gbdt",
            "entities": [{"symbol": "SYM001", "account_id": f"ACC{account:04d}"}]}


def test_a_slow_feature_lookup_is_504_naming_the_stage_and_is_cancelled(
        keel_app: KeelApp) -> None:
    with changed(keel_app, Ingress={"request_timeout_s": BUDGET_S},
                 FeatureService={"batch_wait_timeout_s": SLOW_BATCH_S}):
        before = served_rows("FeatureService")
        answer = httpx.post(f"{keel_app.base_url}/v1/decide", json=decide_body(7), timeout=30)
        assert answer.status_code == 504, answer.text
        assert answer.json()["stage"] == "features", answer.text
        wait_until_batches_would_have_run()
        assert served_rows("FeatureService") == before, "the timed-out lookup still ran"


def test_the_feature_services_own_lookup_timeout_is_504_naming_the_stage(
        keel_app: KeelApp) -> None:
    with changed(keel_app, FeatureService={"lookup_timeout_s": 1e-6}):
        answer = httpx.post(f"{keel_app.base_url}/v1/decide", json=decide_body(8), timeout=30)
        assert answer.status_code == 504, answer.text
        body = answer.json()
        assert body["stage"] == "features" and "lookup_timeout_s" in body["error"], body
    answer = httpx.post(f"{keel_app.base_url}/v1/decide", json=decide_body(8), timeout=30)
    assert answer.status_code == 200, answer.text


def test_an_overloaded_ingress_answers_keels_json_503_with_retry_after(
        keel_app: KeelApp) -> None:
    """More requests than the ingress holds (user_config.max_requests) are turned away at
    once by Keel itself: 503 with Keel's JSON error and Retry-After, never Ray's plain
    text; the admitted ones are answered."""
    with changed(keel_app, Ingress={"max_requests": 2},
                 linear={"batch_wait_timeout_s": SLOW_BATCH_S}):
        def one(i: int) -> httpx.Response:
            return httpx.post(f"{keel_app.base_url}/v2/models/linear/infer",
                              json=infer_row(100 + i), timeout=60)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(16)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {200, 503}, statuses
    turned_away = [a for a in answers if a.status_code == 503]
    assert turned_away, "16 at once against max_requests 2 per replica must overflow"
    for answer in turned_away:
        assert answer.headers.get("retry-after") == "1", dict(answer.headers)
        assert answer.headers["content-type"] == "application/json", answer.text
        assert "max_requests" in answer.json()["error"]
    assert statuses.count(200) >= 2
